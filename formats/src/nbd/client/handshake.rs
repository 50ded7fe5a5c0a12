//! The handshake: fixed newstyle negotiation up to `NBD_OPT_GO` (proto.md
//! "Handshake").

use std::io::BufReader;

use crate::nbd::client::stream::Stream;
use crate::nbd::client::tls::TlsStream;
use crate::nbd::client::{ConnectOptions, Connection};
use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, Info, OptionReplyHeader};
use crate::nbd::tls::TlsClient;

impl Connection {
    /// Checks what the client will send, before connecting.
    pub(super) fn check_request(export: &str, opts: &ConnectOptions) -> Result<(), NbdError> {
        if opts.timeout.is_zero() {
            return Err(NbdError::InvalidRequest {
                what: "the connection timeout must be nonzero".into(),
            });
        }
        if export.len() > proto::MAX_STRING {
            return Err(NbdError::InvalidRequest {
                what: "export name longer than 4096 bytes".into(),
            });
        }
        for c in &opts.meta_contexts {
            if c.is_empty() || c.len() > proto::MAX_STRING || !c.contains(':') {
                return Err(NbdError::InvalidRequest {
                    what: format!("bad metadata context name {c:?} (expected NAMESPACE:NAME)"),
                });
            }
        }
        Ok(())
    }

    /// Runs the handshake on a fresh connection, up to the transmission
    /// phase: greeting, client flags, TLS when `tls` is given, then the
    /// options.
    pub(super) fn negotiate(
        &mut self,
        export: &str,
        opts: &ConnectOptions,
        tls: Option<&TlsClient>,
    ) -> Result<(), NbdError> {
        let mut b8 = [0u8; 8];
        self.recv(&mut b8, "reading the server's greeting")?;
        if u64::from_be_bytes(b8) != proto::INIT_MAGIC {
            return Err(NbdError::protocol(format!(
                "greeting {b8:02x?} is not NBDMAGIC (not an NBD server?)"
            )));
        }
        self.recv(&mut b8, "reading the server's greeting")?;
        match u64::from_be_bytes(b8) {
            proto::OPTS_MAGIC => {}
            proto::CLISERV_MAGIC => {
                return Err(NbdError::Handshake {
                    what: "the server uses oldstyle negotiation, which is not supported".into(),
                })
            }
            m => {
                return Err(NbdError::protocol(format!(
                    "second greeting magic {m:#x} is not IHAVEOPT"
                )))
            }
        }
        let mut b2 = [0u8; 2];
        self.recv(&mut b2, "reading the server's greeting")?;
        let hs_flags = u16::from_be_bytes(b2);
        if hs_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Handshake {
                what: "the server does not support fixed newstyle negotiation".into(),
            });
        }
        let no_zeroes = hs_flags & proto::FLAG_NO_ZEROES != 0;
        let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= proto::FLAG_C_NO_ZEROES;
        }
        self.send(&client_flags.to_be_bytes(), "sending client flags")?;

        let r = match tls {
            Some(tls) => self.start_tls(tls),
            None => Ok(()),
        }
        .and_then(|()| self.negotiate_options(export, opts, no_zeroes))
        .map_err(|e| match (e, tls) {
            // In TLS 1.3 the server judges the client's certificate after
            // the client has finished its handshake: a refusal shows as
            // the end of the connection, or an alert, on the next read.
            // (An alert is described as it is.)
            (NbdError::Disconnected { doing } | NbdError::Io { doing, .. }, Some(t))
                if t.client_cert_requested() && !t.has_client_cert =>
            {
                NbdError::Tls {
                    doing,
                    what: TlsClient::demanded_text(),
                    certificate: true,
                }
            }
            (e, _) => e,
        });
        if let Err(e) = &r {
            if matches!(
                e,
                NbdError::OptionRefused { .. }
                    | NbdError::ContextRefused { .. }
                    | NbdError::TlsRequired
                    | NbdError::TlsNotOffered { .. }
            ) {
                // The stream is in step: end it with a soft disconnect
                // (proto.md "Termination of the session during option
                // haggling"). No need to wait for the server's ACK.
                let abort = proto::encode_option(proto::OPT_ABORT, &[]);
                let _ = self.send(&abort, "aborting negotiation");
            }
        }
        r
    }

    /// `NBD_OPT_STARTTLS`, the first option (proto.md "TLS support"),
    /// then the TLS handshake on the same socket; the other options follow
    /// inside TLS. A server that refuses it fails the connection: there
    /// is no plaintext fallback.
    fn start_tls(&mut self, tls: &TlsClient) -> Result<(), NbdError> {
        let opt = proto::OPT_STARTTLS;
        let (h, payload) = self.option(opt, &[])?;
        match h.reply {
            proto::REP_ACK => {}
            r if r & proto::REP_FLAG_ERROR != 0 => {
                return Err(NbdError::TlsNotOffered {
                    reply: r,
                    message: proto::sanitize(&payload),
                })
            }
            _ => return Err(unexpected(opt, h)),
        }
        if !self.rx.io.buffer().is_empty() {
            return Err(NbdError::protocol(
                "data before the TLS handshake that NBD_OPT_STARTTLS started",
            ));
        }
        let doing = "starting TLS";
        let stand_in = self
            .rx
            .io
            .get_ref()
            .try_clone()
            .map_err(|source| NbdError::Io { doing, source })?;
        let plain = std::mem::replace(&mut self.rx.io, BufReader::with_capacity(0, stand_in));
        let tls = TlsStream::handshake(plain.into_inner(), tls)
            .map_err(|e| NbdError::from_io(e, "doing the TLS handshake", self.s.timeout))?;
        self.rx.io = BufReader::with_capacity(64 * 1024, Stream::Tls(tls));
        Ok(())
    }

    fn negotiate_options(
        &mut self,
        export: &str,
        opts: &ConnectOptions,
        no_zeroes: bool,
    ) -> Result<(), NbdError> {
        if opts.extended_headers {
            let (h, payload) = self.option(proto::OPT_EXTENDED_HEADERS, &[])?;
            match h.reply {
                proto::REP_ACK => {
                    self.s.extended = true;
                    self.s.structured = true;
                }
                proto::REP_ERR_SHUTDOWN => {
                    return Err(refused(proto::OPT_EXTENDED_HEADERS, h, &payload))
                }
                r if r & proto::REP_FLAG_ERROR != 0 => {}
                _ => return Err(unexpected(proto::OPT_EXTENDED_HEADERS, h)),
            }
        }
        let mut structured_refusal = None;
        if !self.s.extended {
            let (h, payload) = self.option(proto::OPT_STRUCTURED_REPLY, &[])?;
            match h.reply {
                proto::REP_ACK => self.s.structured = true,
                proto::REP_ERR_SHUTDOWN => {
                    return Err(refused(proto::OPT_STRUCTURED_REPLY, h, &payload))
                }
                r if r & proto::REP_FLAG_ERROR != 0 => {
                    structured_refusal = Some(refused(proto::OPT_STRUCTURED_REPLY, h, &payload));
                }
                _ => return Err(unexpected(proto::OPT_STRUCTURED_REPLY, h)),
            }
        }
        if !opts.meta_contexts.is_empty() {
            if let Some(refusal) = structured_refusal {
                // Block status needs structured replies.
                return Err(refusal);
            }
            self.set_meta_contexts(export, &opts.meta_contexts)?;
        }
        self.go(export, no_zeroes)
    }

    /// Sends option `opt` and reads one reply to it.
    fn option(&mut self, opt: u32, data: &[u8]) -> Result<(OptionReplyHeader, Vec<u8>), NbdError> {
        self.send(&proto::encode_option(opt, data), "sending an option")?;
        self.option_reply(opt)
    }

    fn option_reply(&mut self, opt: u32) -> Result<(OptionReplyHeader, Vec<u8>), NbdError> {
        let mut b = [0u8; OptionReplyHeader::SIZE];
        self.recv(&mut b, "reading an option reply")?;
        let h = OptionReplyHeader::decode(&b)?;
        if h.reply == proto::REP_ERR_TLS_REQD && h.option == opt {
            // Skip the message: the refusal says it all.
            self.recv_vec(
                u64::from(h.len),
                u64::from(proto::MAX_OPTION_REPLY),
                "option reply",
            )?;
            return Err(NbdError::TlsRequired);
        }
        if h.option != opt {
            return Err(NbdError::protocol(format!(
                "reply to option {} while {} was asked",
                h.option,
                proto::opt_name(opt)
            )));
        }
        let payload = self.recv_vec(
            u64::from(h.len),
            u64::from(proto::MAX_OPTION_REPLY),
            "option reply",
        )?;
        if h.reply == proto::REP_ACK && !payload.is_empty() {
            return Err(NbdError::protocol("NBD_REP_ACK with a payload"));
        }
        Ok((h, payload))
    }

    fn set_meta_contexts(&mut self, export: &str, names: &[String]) -> Result<(), NbdError> {
        let opt = proto::OPT_SET_META_CONTEXT;
        let (mut h, mut payload) = self.option(opt, &proto::meta_context_data(export, names))?;
        loop {
            match h.reply {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::decode_meta_context(&payload)?;
                    if self.s.contexts.iter().any(|(i, _)| *i == id) {
                        return Err(NbdError::protocol(format!(
                            "metadata context id {id} given twice"
                        )));
                    }
                    self.s.contexts.push((id, name));
                }
                proto::REP_ACK => break,
                r if r & proto::REP_FLAG_ERROR != 0 => return Err(refused(opt, h, &payload)),
                _ => return Err(unexpected(opt, h)),
            }
            (h, payload) = self.option_reply(opt)?;
        }
        for name in names {
            if !self.has_context(name) {
                return Err(NbdError::ContextRefused { name: name.clone() });
            }
        }
        Ok(())
    }

    fn go(&mut self, export: &str, no_zeroes: bool) -> Result<(), NbdError> {
        let opt = proto::OPT_GO;
        let data = proto::go_data(export, &[proto::INFO_BLOCK_SIZE]);
        let (mut h, mut payload) = self.option(opt, &data)?;
        let mut export_info = None;
        loop {
            match h.reply {
                proto::REP_INFO => match proto::decode_info(&payload)? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        proto::check_block_sizes(min, preferred, max)?;
                        (self.s.min_block, self.s.preferred_block, self.s.max_block) =
                            (min, preferred, max);
                    }
                    Info::Other(_) => {}
                },
                proto::REP_ACK => break,
                proto::REP_ERR_UNSUP => return self.export_name(export, no_zeroes),
                r if r & proto::REP_FLAG_ERROR != 0 => return Err(refused(opt, h, &payload)),
                _ => return Err(unexpected(opt, h)),
            }
            (h, payload) = self.option_reply(opt)?;
        }
        let (size, flags) = export_info
            .ok_or_else(|| NbdError::protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"))?;
        (self.s.size, self.s.flags) = (check_size(size)?, flags);
        Ok(())
    }

    /// The fallback for servers without `NBD_OPT_GO` (proto.md "Option
    /// types", `NBD_OPT_EXPORT_NAME`): no errors, no block sizes.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(), NbdError> {
        let msg = proto::encode_option(proto::OPT_EXPORT_NAME, export.as_bytes());
        self.send(&msg, "sending an option")?;
        let mut b = [0u8; 10 + 124];
        let len = if no_zeroes { 10 } else { b.len() };
        self.recv(&mut b[..len], "reading export information")?;
        self.s.size = check_size(u64::from_be_bytes(b[..8].try_into().expect("8 bytes")))?;
        self.s.flags = u16::from_be_bytes([b[8], b[9]]);
        Ok(())
    }
}

/// Refuses export sizes offsets cannot address (QEMU's limit too), so no
/// offset arithmetic can overflow.
fn check_size(size: u64) -> Result<u64, NbdError> {
    if size > i64::MAX as u64 {
        return Err(NbdError::protocol(format!(
            "export size {size} is larger than {}",
            i64::MAX
        )));
    }
    Ok(size)
}

fn refused(opt: u32, h: OptionReplyHeader, payload: &[u8]) -> NbdError {
    NbdError::OptionRefused {
        option: proto::opt_name(opt),
        reply: h.reply,
        message: proto::sanitize(payload),
    }
}

fn unexpected(opt: u32, h: OptionReplyHeader) -> NbdError {
    NbdError::protocol(format!(
        "{} in reply to {}",
        proto::rep_name(h.reply),
        proto::opt_name(opt)
    ))
}
