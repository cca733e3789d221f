"""Train state, optimizer, the one train step, and the loop that runs it."""
