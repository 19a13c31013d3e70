"""The optimize stage: passes that turn one model into variants, and the recipe engine."""
