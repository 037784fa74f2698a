"""Test and demo helpers (a tiny offline model, synthetic users from real text). Nothing at run time imports them."""
