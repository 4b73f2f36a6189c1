//! Test-only crate: its `tests/` run `hlo-builder` programs on the PJRT CPU plugin (every op
//! family against host references, VJPs against finite differences, gather/scatter, buffer
//! donation, FFI custom calls, SPMD sharding). It lives apart from `hlo-builder` so that the
//! builder does not depend on the runtime; it has no library code.

#![forbid(unsafe_code)]
