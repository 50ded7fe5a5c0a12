//! NBD wire format: constants, and encoding and decoding of the messages
//! the client sends and receives.
//!
//! Everything here is pure (bytes in, values out) so it can be tested with
//! hand-built bytes. All integers are big-endian ("network byte order",
//! proto.md "Conventions"). Section names in the doc comments are those of
//! `doc/proto.md` in the NBD project; the extended-header items follow the
//! revision of that document that added `NBD_OPT_EXTENDED_HEADERS` (as
//! implemented by QEMU 8.1 and later).

use crate::nbd::error::NbdError;

// ---------------------------------------------------------------------------
// Handshake

/// IANA port for NBD (proto.md "Newstyle negotiation").
pub const DEFAULT_PORT: u16 = 10809;
/// `NBDMAGIC`, the first 8 bytes a server sends (proto.md "Newstyle
/// negotiation").
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic of newstyle negotiation, and the magic
/// of every option request (proto.md "Newstyle negotiation").
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The second magic of an oldstyle server (proto.md "Oldstyle
/// negotiation"), which qbackup does not support.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply (proto.md "Fixed newstyle negotiation").
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: fixed newstyle (proto.md "Handshake flags").
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes (proto.md
/// "Handshake flags").
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle (proto.md "Client flags").
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding (proto.md "Client flags").
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set (proto.md "Transmission flags").
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only (proto.md "Transmission
/// flags").
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (proto.md
/// "Transmission flags").
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one cache (proto.md
/// "Transmission flags").
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: enter transmission, old form without errors (proto.md "Option
/// types").
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation (proto.md "Option types").
pub const OPT_ABORT: u32 = 2;
/// Option: upgrade the connection to TLS; must be the first option, and
/// the option haggling restarts inside TLS (proto.md "Option types",
/// `NBD_OPT_STARTTLS`, and "TLS support").
pub const OPT_STARTTLS: u32 = 5;
/// Option: enter transmission with `NBD_REP_INFO` replies (proto.md
/// "Option types", `NBD_OPT_INFO` and `NBD_OPT_GO`).
pub const OPT_GO: u32 = 7;
/// Option: structured replies (proto.md "Option types").
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select metadata contexts (proto.md "Option types").
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 32-byte request and reply headers with 64-bit lengths
/// (proto.md "Option types", extended-headers revision).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success, end of replies (proto.md "Option reply types").
pub const REP_ACK: u32 = 1;
/// Option reply: a piece of export information (proto.md "Option reply
/// types").
pub const REP_INFO: u32 = 3;
/// Option reply: one selected metadata context (proto.md "Option reply
/// types").
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type (proto.md "Option reply types").
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option (proto.md "Option reply types").
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Forbidden by policy (proto.md "Option reply types").
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Invalid option (proto.md "Option reply types").
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Not supported on the server's platform (proto.md "Option reply types").
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS required (proto.md "Option reply types").
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// No such export (proto.md "Option reply types").
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Server shutting down (proto.md "Option reply types").
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Block size information must be requested (proto.md "Option reply
/// types").
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Request or reply too large (proto.md "Option reply types").
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers required (proto.md "Option reply types",
/// extended-headers revision).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// Information type: size and transmission flags (proto.md "Option reply
/// types", `NBD_REP_INFO`).
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical name (proto.md "Option reply types").
pub const INFO_NAME: u16 = 1;
/// Information type: description (proto.md "Option reply types").
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints (proto.md "Option reply
/// types", "Block size constraints").
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Option replies longer than this are refused: no reply the client asks
/// for carries more than a 4096-byte string and a few integers (proto.md
/// "Conventions" limits strings to 4096 bytes).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest string the protocol allows (proto.md "Conventions").
pub const MAX_STRING: usize = 4096;

// ---------------------------------------------------------------------------
// Transmission

/// Magic of a compact request (proto.md "Request message").
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request (proto.md "Request message",
/// extended-headers revision).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply (proto.md "Simple reply message").
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (proto.md "Structured reply chunk
/// message").
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk (proto.md "Structured reply chunk
/// message", extended-headers revision).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Command: read (proto.md "Request types").
pub const CMD_READ: u16 = 0;
/// Command: disconnect, no reply (proto.md "Request types").
pub const CMD_DISC: u16 = 2;
/// Command: block status (proto.md "Request types").
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: one extent per context (proto.md "Command flags").
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Reply flag: last chunk of a reply (proto.md "Structured reply flags").
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Chunk type: nothing, only as the last chunk (proto.md "Structured reply
/// types").
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset (proto.md "Structured reply types").
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes (proto.md "Structured reply
/// types").
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors with 32-bit lengths (proto.md
/// "Structured reply types").
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status descriptors with 64-bit lengths and flags,
/// used instead of [`REPLY_TYPE_BLOCK_STATUS`] with extended headers
/// (proto.md "Structured reply types", extended-headers revision).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type (proto.md "Structured reply types").
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: error for the whole request (proto.md "Structured reply
/// types").
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: error at an offset (proto.md "Structured reply types").
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation` flag: not allocated (proto.md "`base:allocation`
/// metadata context").
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeroes (proto.md "`base:allocation`
/// metadata context").
pub const STATE_ZERO: u32 = 1 << 1;

/// Error value EPERM (proto.md "Error values").
pub const EPERM: u32 = 1;
/// Error value EIO (proto.md "Error values").
pub const EIO: u32 = 5;
/// Error value ENOMEM (proto.md "Error values").
pub const ENOMEM: u32 = 12;
/// Error value EINVAL (proto.md "Error values").
pub const EINVAL: u32 = 22;
/// Error value ENOSPC (proto.md "Error values").
pub const ENOSPC: u32 = 28;
/// Error value EOVERFLOW (proto.md "Error values").
pub const EOVERFLOW: u32 = 75;
/// Error value ENOTSUP (proto.md "Error values").
pub const ENOTSUP: u32 = 95;
/// Error value ESHUTDOWN (proto.md "Error values").
pub const ESHUTDOWN: u32 = 108;

/// Default maximum request length a client should use when the server
/// advertises none, and the largest a client may use without risking
/// being taken for a denial of service (proto.md "Block size
/// constraints").
pub const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;
/// Default minimum block size (proto.md "Block size constraints").
pub const DEFAULT_MIN_BLOCK: u32 = 1;
/// Default preferred block size (proto.md "Block size constraints").
pub const DEFAULT_PREFERRED_BLOCK: u32 = 4096;

// ---------------------------------------------------------------------------
// Names for messages

/// The name of option `opt` (proto.md "Option types").
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}

/// The name of option reply type `rep` (proto.md "Option reply types").
pub fn rep_name(rep: u32) -> String {
    let name = match rep {
        REP_ACK => "NBD_REP_ACK",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => return format!("option reply type {rep:#x}"),
    };
    name.to_string()
}

/// The name and meaning of NBD error value `errno` (proto.md "Error
/// values").
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (cannot allocate memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left on device)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (operation not supported)",
        ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        _ => return format!("error {errno}"),
    };
    name.to_string()
}

/// A server string made fit for a one-line message: invalid UTF-8
/// replaced, control characters replaced by spaces, cut to
/// [`MAX_STRING`] bytes.
pub fn sanitize(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(MAX_STRING)];
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------
// Byte helpers

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends a string with its 32-bit length (the string encoding of option
/// data, proto.md "Option types").
fn put_string(out: &mut Vec<u8>, s: &str) {
    // Callers check lengths against MAX_STRING, far below u32::MAX.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------
// Options

/// An option request: `IHAVEOPT`, option, data length, data (proto.md
/// "Newstyle negotiation").
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The data of `NBD_OPT_GO`: export name, then the information requests
/// (proto.md "Option types", `NBD_OPT_INFO` and `NBD_OPT_GO`).
pub fn go_data(export: &str, info_requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    put_string(&mut out, export);
    out.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
    for info in info_requests {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: export name, number of queries,
/// each query as a string (proto.md "Option types").
pub fn meta_context_data(export: &str, queries: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    put_string(&mut out, export);
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        put_string(&mut out, q);
    }
    out
}

/// The fixed part of an option reply (proto.md "Fixed newstyle
/// negotiation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 20;

    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, NbdError> {
        let magic = be64(b, 0);
        if magic != REP_MAGIC {
            return Err(NbdError::protocol(format!(
                "option reply magic {magic:#x} (expected {REP_MAGIC:#x})"
            )));
        }
        Ok(OptionReplyHeader {
            option: be32(b, 8),
            reply: be32(b, 12),
            len: be32(b, 16),
        })
    }
}

/// One `NBD_REP_INFO` reply (proto.md "Option reply types").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// Information the client does not use (name, description, unknown).
    Other(u16),
}

/// Decodes an `NBD_REP_INFO` payload (proto.md "Option reply types").
pub fn decode_info(p: &[u8]) -> Result<Info, NbdError> {
    if p.len() < 2 {
        return Err(NbdError::protocol(format!(
            "NBD_REP_INFO of {} bytes",
            p.len()
        )));
    }
    let kind = be16(p, 0);
    let want = match kind {
        INFO_EXPORT => 12,
        INFO_BLOCK_SIZE => 14,
        _ => return Ok(Info::Other(kind)),
    };
    if p.len() != want {
        return Err(NbdError::protocol(format!(
            "NBD_REP_INFO type {kind} of {} bytes (expected {want})",
            p.len()
        )));
    }
    Ok(match kind {
        INFO_EXPORT => Info::Export {
            size: be64(p, 2),
            flags: be16(p, 10),
        },
        _ => Info::BlockSize {
            min: be32(p, 2),
            preferred: be32(p, 6),
            max: be32(p, 10),
        },
    })
}

/// Checks advertised block size constraints (proto.md "Block size
/// constraints"): minimum a power of 2 no larger than 64 KiB, preferred a
/// power of 2 no smaller than the minimum, maximum a multiple of the
/// minimum (or `0xffffffff`) no smaller than the minimum.
pub fn check_block_sizes(min: u32, preferred: u32, max: u32) -> Result<(), NbdError> {
    let ok = min.is_power_of_two()
        && min <= 64 * 1024
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min
        && (max % min == 0 || max == u32::MAX);
    if ok {
        Ok(())
    } else {
        Err(NbdError::protocol(format!(
            "invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}"
        )))
    }
}

/// Decodes an `NBD_REP_META_CONTEXT` payload: context id and name
/// (proto.md "Option reply types").
pub fn decode_meta_context(p: &[u8]) -> Result<(u32, String), NbdError> {
    if p.len() < 5 || p.len() > 4 + MAX_STRING {
        return Err(NbdError::protocol(format!(
            "NBD_REP_META_CONTEXT of {} bytes",
            p.len()
        )));
    }
    let name = std::str::from_utf8(&p[4..])
        .map_err(|_| NbdError::protocol("metadata context name is not UTF-8"))?;
    Ok((be32(p, 0), name.to_string()))
}

// ---------------------------------------------------------------------------
// Requests and replies

/// A transmission request (proto.md "Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// The cookie ("handle") the reply carries back.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length; at most `u32::MAX` without extended headers.
    pub len: u64,
}

impl Request {
    /// Encodes a compact (28-byte) or, with `extended`, a 32-byte request
    /// header (proto.md "Request message").
    pub fn encode(&self, extended: bool) -> Result<Vec<u8>, NbdError> {
        let mut out = Vec::with_capacity(32);
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.len.to_be_bytes());
        } else {
            let len = u32::try_from(self.len).map_err(|_| NbdError::InvalidRequest {
                what: format!("length {} does not fit a compact request", self.len),
            })?;
            out.extend_from_slice(&len.to_be_bytes());
        }
        Ok(out)
    }
}

/// The header of a reply: a simple reply, or one chunk of a structured or
/// extended reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (proto.md "Simple reply message"); for a successful
    /// read, the data follows.
    Simple {
        /// NBD error value, 0 for success.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured or extended reply chunk (proto.md "Structured reply
    /// chunk message"); `len` bytes of payload follow.
    Chunk(ChunkHeader),
}

/// A structured or extended reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset, echoed in extended replies only.
    pub offset: Option<u64>,
    /// Payload length.
    pub len: u64,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// How many bytes of header follow a reply magic: 12 for a simple reply,
/// 16 for a structured chunk, 28 for an extended chunk; `None` for an
/// unknown magic (proto.md "Simple reply message", "Structured reply chunk
/// message").
pub fn reply_rest_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(12),
        STRUCTURED_REPLY_MAGIC => Some(16),
        EXTENDED_REPLY_MAGIC => Some(28),
        _ => None,
    }
}

/// Decodes the rest of a reply header whose magic was `magic` (`rest` is
/// [`reply_rest_len`] bytes).
pub fn decode_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader, NbdError> {
    if Some(rest.len()) != reply_rest_len(magic) {
        return Err(NbdError::protocol(format!("reply magic {magic:#x}")));
    }
    Ok(match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: be32(rest, 0),
            cookie: be64(rest, 4),
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk(ChunkHeader {
            flags: be16(rest, 0),
            kind: be16(rest, 2),
            cookie: be64(rest, 4),
            offset: None,
            len: u64::from(be32(rest, 12)),
        }),
        _ => ReplyHeader::Chunk(ChunkHeader {
            flags: be16(rest, 0),
            kind: be16(rest, 2),
            cookie: be64(rest, 4),
            offset: Some(be64(rest, 12)),
            len: be64(rest, 20),
        }),
    })
}

/// An error chunk's content (proto.md "Structured reply types",
/// `NBD_REPLY_TYPE_ERROR` and `NBD_REPLY_TYPE_ERROR_OFFSET`; an unknown type
/// with bit 15 set has the same leading fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// NBD error value (nonzero).
    pub errno: u32,
    /// The server's message, sanitized.
    pub message: String,
    /// Where the error is, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Largest error chunk payload accepted: the fixed fields and a 4096-byte
/// message (proto.md "Structured reply types").
pub const MAX_ERROR_PAYLOAD: u64 = 14 + MAX_STRING as u64;

/// Decodes the payload of an error chunk of type `kind`.
pub fn decode_error_chunk(kind: u16, p: &[u8]) -> Result<ErrorChunk, NbdError> {
    let fixed_tail = if kind == REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    if p.len() < 6 + fixed_tail {
        return Err(NbdError::protocol(format!(
            "error chunk type {kind:#x} of {} bytes",
            p.len()
        )));
    }
    let errno = be32(p, 0);
    let msg_len = usize::from(be16(p, 4));
    let tail_ok = match kind {
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => p.len() == 6 + msg_len + fixed_tail,
        // Unknown error types may carry more fields after the message.
        _ => p.len() >= 6 + msg_len,
    };
    if !tail_ok || msg_len > MAX_STRING {
        return Err(NbdError::protocol(format!(
            "error chunk type {kind:#x}: message of {msg_len} bytes in a payload of {}",
            p.len()
        )));
    }
    if errno == 0 {
        return Err(NbdError::protocol("error chunk with error value 0"));
    }
    let message = sanitize(&p[6..6 + msg_len]);
    let offset = (kind == REPLY_TYPE_ERROR_OFFSET).then(|| be64(p, 6 + msg_len));
    Ok(ErrorChunk {
        errno,
        message,
        offset,
    })
}

/// Decodes an `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset and nonzero
/// size (proto.md "Structured reply types").
pub fn decode_offset_hole(p: &[u8]) -> Result<(u64, u32), NbdError> {
    if p.len() != 12 {
        return Err(NbdError::protocol(format!(
            "NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes (expected 12)",
            p.len()
        )));
    }
    let size = be32(p, 8);
    if size == 0 {
        return Err(NbdError::protocol("NBD_REPLY_TYPE_OFFSET_HOLE of size 0"));
    }
    Ok((be64(p, 0), size))
}

/// Decodes the offset at the start of an `NBD_REPLY_TYPE_OFFSET_DATA`
/// payload (proto.md "Structured reply types").
pub fn decode_data_offset(p: &[u8; 8]) -> u64 {
    u64::from_be_bytes(*p)
}

/// Decodes a block status chunk: the context id and its descriptors as
/// (length, flags). Compact chunks (`NBD_REPLY_TYPE_BLOCK_STATUS`) are a
/// 32-bit id then 8-byte descriptors; extended ones
/// (`NBD_REPLY_TYPE_BLOCK_STATUS_EXT`) a 32-bit id, a 32-bit count, then
/// 16-byte descriptors (proto.md "Structured reply types"). Every
/// descriptor must have a nonzero length.
pub fn decode_block_status(extended: bool, p: &[u8]) -> Result<(u32, Vec<(u64, u64)>), NbdError> {
    let (head, each) = if extended { (8, 16) } else { (4, 8) };
    let what = if extended {
        "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"
    } else {
        "NBD_REPLY_TYPE_BLOCK_STATUS"
    };
    if p.len() < head + each || (p.len() - head) % each != 0 {
        return Err(NbdError::protocol(format!("{what} of {} bytes", p.len())));
    }
    let count = (p.len() - head) / each;
    if extended && be32(p, 4) as usize != count {
        return Err(NbdError::protocol(format!(
            "{what} says {} descriptors in {} bytes",
            be32(p, 4),
            p.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for d in p[head..].chunks_exact(each) {
        let (len, flags) = if extended {
            (be64(d, 0), be64(d, 8))
        } else {
            (u64::from(be32(d, 0)), u64::from(be32(d, 4)))
        };
        if len == 0 {
            return Err(NbdError::protocol(format!(
                "{what} with a zero-length descriptor"
            )));
        }
        out.push((len, flags));
    }
    Ok((be32(p, 0), out))
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
