"""From stored instances to a checked CT volume in Hounsfield units."""
