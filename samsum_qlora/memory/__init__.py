"""Memory: estimates of a stage's peak (pure functions), the planners that pick settings within a budget, and
the one plan_memory that the train and evaluate stages call."""
