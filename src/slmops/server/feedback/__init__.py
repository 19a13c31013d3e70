"""The feedback loop on the control plane: rules map alerts to actions (pause, notify, improve).

``rules`` is the YAML schema, ``tables`` the rows (rules, the actions taken per alert, improvement
jobs), ``engine`` matches new alerts against the rules and acts, ``api`` the operator routes (rules
applied like blueprints; jobs claimed and completed by `slmops improve-worker`).
"""
