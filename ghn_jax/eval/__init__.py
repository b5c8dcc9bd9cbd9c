"""Parts of the evaluation: networks, GHN loading, data and reports."""
