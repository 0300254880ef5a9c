"""Verification on the target device itself: `deploy verify BUILD --on ssh://user@host` runs a build's accuracy
and latency checks on a remote edge box through the system's ssh and scp (ssh.py), with a small script that
needs only Python, numpy and onnxruntime there (device_runner.py), and records them in the build's report
(verify.py)."""
