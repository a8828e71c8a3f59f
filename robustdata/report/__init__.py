"""Reports: markdown/HTML documents, headless plots, the audit, robustify and results pages."""
