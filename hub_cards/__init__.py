"""Model-card templates and the push-to-Hub tool (issue: publishing and downloading)."""
