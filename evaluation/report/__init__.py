"""What people look at: the open-loop Markdown report, plots and animations, Rerun recordings."""
