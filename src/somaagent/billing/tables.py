"""billing tables (PLACEHOLDER, issue 6 in progress)."""
