"""Fused-op entry points. Each op lives in its own folder: a pure-PyTorch reference (the CPU
path and the test oracle) beside its fast GPU backends, behind one public function that
validates its inputs and picks the backend."""
