"""Layout that fits a 1280×720 laptop screen and up: one style sheet for every page and the
column settings that keep a table's key columns in view.

`apply_layout()` runs once per rerun from `app.py`, before the page. It narrows the wide layout's
side padding on screens below 1600 px, lets button labels, tab names and selector options wrap
instead of ending in "…", and wraps every code and log box (`st.code`) instead of cutting its
long lines off. `fit_columns` builds an `st.dataframe` `column_config` that pins the key columns
to the left (they stay in view when the rest scrolls), caps the width of long text columns, and
puts a short header over a long name with the long one as its help text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import pandas as pd
import streamlit as st

ColumnWidth = Literal["small", "medium", "large"] | int

LAYOUT_CSS = """
<style>
/* the wide layout pads 5rem a side: on a laptop that takes ~160 px from every table */
@media (max-width: 1600px) {
  [data-testid="stMainBlockContainer"] { padding-left: 2rem; padding-right: 2rem; }
}
/* button labels wrap rather than end in an ellipsis ("Prev…") */
[data-testid^="stBaseButton"] [data-testid="stMarkdownContainer"] p,
[data-testid^="stBaseButton"] div {
  white-space: normal; overflow: visible; text-overflow: clip;
}
/* horizontal radio groups and tab bars wrap onto a second row */
[data-testid="stRadio"] [role="radiogroup"] { flex-wrap: wrap; row-gap: 0.25rem; }
[data-testid="stWidgetLabel"] p { white-space: normal; overflow-wrap: anywhere; }
/* logs and commands wrap instead of being cut off at the box's edge */
[data-testid="stCode"] pre, [data-testid="stCode"] pre code {
  white-space: pre-wrap !important; overflow-wrap: anywhere; word-break: break-word;
}
</style>
"""


def apply_layout() -> None:
    """Add the app's layout style sheet to the page (call once per rerun, before the page)."""
    st.html(LAYOUT_CSS)


def fit_columns(
    columns: Iterable[str],
    *,
    pin: Iterable[str] = (),
    widths: Mapping[str, ColumnWidth] | None = None,
    short: Mapping[str, str] | None = None,
    help: Mapping[str, str] | None = None,  # noqa: A002 - Streamlit's own name for it
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A `column_config` for `st.dataframe` whose key columns stay in view at 1280 px.

    `pin` columns are pinned to the left; `widths` caps a column ("small", "medium", "large"
    or pixels); `short` gives a column a shorter header, its full name going into the help text
    together with `help`. `base` holds column configs the page already has (a number format,
    a checkbox): their settings are kept and only the pinning, width, header and help are
    filled in where `base` does not set them. Columns not named anywhere are left as they are.
    """
    widths, short, help = dict(widths or {}), dict(short or {}), dict(help or {})
    pinned = set(pin)
    config: dict[str, Any] = {}
    for name in columns:
        given = dict((base or {}).get(name) or {})
        if name not in pinned and name not in widths and name not in short and name not in help:
            if given:
                config[name] = given
            continue
        tips = [t for t in (name if name in short else None, help.get(name)) if t]
        column = st.column_config.Column(
            short.get(name, name),
            width=widths.get(name),
            help=". ".join(tips) or None,
            pinned=True if name in pinned else None,
        )
        kept = {
            k: v for k, v in given.items() if v is not None and not (k == "label" and name in short)
        }
        config[name] = {**column, **kept}
    return config


def key_table(
    frame: pd.DataFrame,
    *,
    pin: Iterable[str] | None = None,
    widths: Mapping[str, ColumnWidth] | None = None,
    short: Mapping[str, str] | None = None,
    help: Mapping[str, str] | None = None,  # noqa: A002 - Streamlit's own name for it
    **kwargs: Any,
) -> Any:
    """`st.dataframe` of `frame` without its index, as wide as its container, its key columns
    (`pin`, by default the first) pinned so a row stays named when the table scrolls sideways;
    `widths`, `short` and `help` as in `fit_columns`, the rest passed to `st.dataframe`."""
    columns = [str(c) for c in frame.columns]
    config = fit_columns(
        columns,
        pin=columns[:1] if pin is None else pin,
        widths=widths,
        short=short,
        help=help,
        base=kwargs.pop("column_config", None),
    )
    kwargs.setdefault("hide_index", True)
    kwargs.setdefault("width", "stretch")
    return st.dataframe(frame, column_config=config, **kwargs)
