//! The wire protocol: frame shapes (`frames`), encodings (`codec`) and error/close codes
//! (`error`). Everything here is pure: bytes in, typed values out, no I/O and no state.

pub mod codec;
pub mod error;
pub mod frames;

pub use codec::Codec;
pub use error::{CloseCode, ErrorCode, ProtoError};
pub use frames::{ClientFrame, ClientOp};
