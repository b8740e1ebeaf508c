"""Pictures of results: image galleries of clusters and pseudo-labels, training curves.

matplotlib is an optional dependency (`pip install 'ssl-cli[viz]'`); only the modules here import
it, and only when a picture is drawn, so every other command works without it.
"""
