"""The programme hub: registers sites, checks and merges their monthly bundles, reports across sites."""
