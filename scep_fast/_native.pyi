# The compiled cffi module built from native/ (see native/build_native.py).
from typing import Any

ffi: Any
lib: Any
