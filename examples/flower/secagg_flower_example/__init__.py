"""secagg_flower_example: a Flower app with DP-SGD clients and secagg's secure aggregation."""
