from robustdata.cli import app

app()
