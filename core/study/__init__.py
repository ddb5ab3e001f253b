"""Study: reading runs, the paper's protocol, statistics, post-training diagnostics and the report."""
