"""What a run leaves to look at: its history (losses, evaluations, samples), the plots and the HTML report."""
