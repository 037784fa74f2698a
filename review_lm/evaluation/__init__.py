"""Scoring generated reviews: overlap metrics, style attribution, stylometry, copy rate, predictions files and
the comparison of evaluated runs.
"""
