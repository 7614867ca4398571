"""What people read and look at: tables, report.md with its plots, prediction pictures."""
