"""The monthly export: de-identified results, statistics and inventory for the screening programme's hub,
signed by the site and encrypted to the hub (see bundle.py for the file format)."""
