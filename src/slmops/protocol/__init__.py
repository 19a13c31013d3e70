"""Wire and file schemas shared by the control plane, the CLI and the edge agent.

Only pydantic and the standard library here: the agent imports this package.
"""
