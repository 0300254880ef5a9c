"""The build machinery: the context stages share (context.py), the plan of stages (plan.py), the runner that walks
it (runner.py), the output folder's safety rules (output.py) and the reports (report.py)."""
