"""The training layer: settings and presets, optimiser and schedules, losses, tasks and the Trainer."""
