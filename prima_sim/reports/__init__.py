"""Reports: timeline plots and predicted-versus-measured comparisons of runs."""
