//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

/// A status code as used by PJRT (`PJRT_Error_Code`) and XLA FFI (`XLA_FFI_Error_Code`); both
/// follow absl's canonical codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: the operation was cancelled.
    Cancelled,
    /// 2: unknown error.
    Unknown,
    /// 3: the caller passed an invalid argument.
    InvalidArgument,
    /// 4: a deadline expired.
    DeadlineExceeded,
    /// 5: something (a device, an FFI target) was not found.
    NotFound,
    /// 6: something already exists.
    AlreadyExists,
    /// 7: permission denied.
    PermissionDenied,
    /// 8: out of memory or another resource.
    ResourceExhausted,
    /// 9: the system is not in a state required for the operation.
    FailedPrecondition,
    /// 10: the operation was aborted.
    Aborted,
    /// 11: out of range.
    OutOfRange,
    /// 12: not implemented by this plugin.
    Unimplemented,
    /// 13: internal error.
    Internal,
    /// 14: unavailable.
    Unavailable,
    /// 15: data loss.
    DataLoss,
    /// 16: unauthenticated.
    Unauthenticated,
    /// Any other numeric code.
    Other(u32),
}

impl ErrorCode {
    /// Maps an absl numeric code.
    pub fn from_code(code: u32) -> Self {
        use ErrorCode::*;
        match code {
            1 => Cancelled,
            2 => Unknown,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            other => Other(other),
        }
    }

    /// The absl numeric code.
    pub fn code(self) -> u32 {
        use ErrorCode::*;
        match self {
            Cancelled => 1,
            Unknown => 2,
            InvalidArgument => 3,
            DeadlineExceeded => 4,
            NotFound => 5,
            AlreadyExists => 6,
            PermissionDenied => 7,
            ResourceExhausted => 8,
            FailedPrecondition => 9,
            Aborted => 10,
            OutOfRange => 11,
            Unimplemented => 12,
            Internal => 13,
            Unavailable => 14,
            DataLoss => 15,
            Unauthenticated => 16,
            Other(c) => c,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(c) => write!(f, "code {c}"),
            other => write!(f, "{other:?} (code {})", other.code()),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PJRT C API call returned an error.
    #[error("{function} failed: [{code}] {message}")]
    Pjrt {
        /// The status code the plugin reported.
        code: ErrorCode,
        /// The PJRT function that failed, e.g. `PJRT_Client_Compile`.
        function: &'static str,
        /// The plugin's message.
        message: String,
    },
    /// The plugin library could not be opened or is not a PJRT plugin.
    #[error("cannot load PJRT plugin {path}: {message}")]
    Load {
        /// The path that was tried.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The plugin's API version or function table is too old for this crate.
    #[error("PJRT plugin {path} has API {major}.{minor} with {slots} function slots: {message}")]
    Version {
        /// The plugin path.
        path: PathBuf,
        /// The plugin's PJRT API major version.
        major: i32,
        /// The plugin's PJRT API minor version.
        minor: i32,
        /// Number of function slots in the plugin's `PJRT_Api`.
        slots: usize,
        /// What is missing.
        message: String,
    },
    /// Compile options that the plugin would reject or (worse) abort on.
    #[error("invalid compile options: {0}")]
    InvalidOptions(String),
    /// A shape, element-type or length mismatch detected before calling the plugin.
    #[error("shape error: {0}")]
    Shape(String),
    /// Installing a plugin (pip download, unzip, checksum) failed.
    #[error("plugin install failed: {0}")]
    Install(String),
    /// A plugin that is never installed implicitly (CUDA, TPU: they are large) is not in the
    /// cache. Install it with [`crate::install::PluginCache::install`].
    #[error(
        "the {kind} plugin ({}=={}) is not installed in {}",
        kind.pin().package,
        kind.pin().version,
        dir.display()
    )]
    NotInstalled {
        /// Which plugin.
        kind: crate::install::PluginKind,
        /// The cache directory that was searched.
        dir: PathBuf,
    },
    /// The CUDA plugin cannot compile without `ptxas` and libdevice, and none were found.
    /// Install them with [`crate::install::PluginCache::install_cuda_tools`].
    #[error(
        "the CUDA plugin needs ptxas and libdevice to compile; none found in {}. Install them \
         (PyPI nvidia-cuda-nvcc and nvidia-nvvm 13.0.88, see pjrt::install::cuda_tool_pins), or \
         set XLA_FLAGS=--xla_gpu_cuda_data_dir=<dir with bin/ptxas and \
         nvvm/libdevice/libdevice.10.bc>",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    CudaToolsNotFound {
        /// The CUDA roots that were searched, in order.
        searched: Vec<PathBuf>,
    },
    /// The process environment is not what a plugin needs, or cannot be changed safely.
    #[error("environment: {0}")]
    Environment(String),
    /// FFI handler registration or use failed.
    #[error("FFI: {0}")]
    Ffi(String),
    /// An argument was invalid (empty target name, wrong device, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The PJRT status code, if this is a [`Error::Pjrt`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Pjrt { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
