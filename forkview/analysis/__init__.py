"""Analysis that needs no model and no screen: peak rules, overlap statistics, reports."""
