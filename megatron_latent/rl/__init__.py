"""RL helpers: rule-based rewards and group-relative advantages (rewards)."""
