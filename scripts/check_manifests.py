#!/usr/bin/env python3
"""Renders every kustomization under deploy/ with `kubectl kustomize` and validates the
output with `kubernetes-validate --strict` (schemas of Kubernetes 1.37).

kubernetes-validate only warns about kinds it has no schema for. LeaderWorkerSet is
such a kind (a CRD), so its pod templates are validated as core/v1 PodTemplates, and
any other kind without a schema fails the check. Before that, a manifest with an unknown
field must be rejected, so the check is known to be able to fail.

Cross-references that schemas cannot see (serviceName, selectors, MASTER_ADDR,
WORLD_SIZE, ports, flags) are checked by tests/tests/deploy_manifests.rs.
Usage: check_manifests.py [KUBERNETES_VERSION]
"""
import pathlib
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
VERSION = sys.argv[1] if len(sys.argv) > 1 else "1.37.0"


def validate(docs, what):
    """True when every document passes strict validation with a schema."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(docs, f)
        f.flush()
        run = subprocess.run(
            [BIN / "kubernetes-validate", "--strict", "--quiet", "-k", VERSION, f.name],
            capture_output=True, text=True,
        )
    out = (run.stdout + run.stderr).strip()
    if out:
        print(f"{what}:\n{out}")
    return run.returncode == 0 and "Couldn't find schema" not in out


def pod_templates(doc):
    """A LeaderWorkerSet's leader and worker templates, as core/v1 PodTemplates."""
    spec = doc["spec"]["leaderWorkerTemplate"]
    name = doc["metadata"]["name"]
    return [
        {"apiVersion": "v1", "kind": "PodTemplate",
         "metadata": {"name": f"{name}-{key}"}, "template": spec[key]}
        for key in ("leaderTemplate", "workerTemplate") if key in spec
    ]


def render(kdir):
    out = subprocess.run([BIN / "kubectl", "kustomize", str(kdir)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {kdir} failed:\n{out.stderr}")
    docs = []
    for doc in yaml.safe_load_all(out.stdout):
        if doc and doc.get("kind") == "LeaderWorkerSet":
            docs += pod_templates(doc)
        elif doc:
            docs.append(doc)
    return docs


def main():
    broken = {"apiVersion": "v1", "kind": "Service",
              "metadata": {"name": "x"}, "spec": {"portz": []}}
    if validate([broken], "self-check (must be rejected)"):
        raise SystemExit("check_manifests: the validator accepted a broken manifest")
    dirs = sorted(p.parent for p in (ROOT / "deploy").rglob("kustomization.yaml"))
    failed = [d for d in dirs if not validate(render(d), d.relative_to(ROOT))]
    for d in dirs:
        print(f"{'FAIL' if d in failed else 'ok  '} {d.relative_to(ROOT)}")
    if failed:
        raise SystemExit(f"check_manifests: {len(failed)} kustomization(s) failed")


if __name__ == "__main__":
    main()
