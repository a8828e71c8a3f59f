from robustdata.cli import run

run()
