"""The API side never loads Docker or AWS code: the workers own every external system."""

import subprocess
import sys


def test_service_never_imports_docker_or_boto3():
    code = (
        "import sys, pkgutil, importlib, service\n"
        "for m in pkgutil.iter_modules(service.__path__):\n"
        "    if m.name != 'wsgi': importlib.import_module('service.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in {'docker', 'boto3', 'botocore', 'workers'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
