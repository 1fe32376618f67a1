"""One module per benchmark section; each ``run(settings)`` returns the section's JSON rows."""
