//! DNS messages (RFC 1035, EDNS0 RFC 6891): just what a policy proxy needs, sans-IO.
//!
//! The proxy reads the header, the one question and the EDNS0 record of a query; of a response
//! the rcode, the TC bit and the answer's A/AAAA/CNAME records (for FQDN learning); and it writes
//! refusals and rewrites message IDs in place. Hand-written rather than hickory-proto because
//! hickory builds an owned `Message` with every record allocated, while a query here costs one
//! allocation (the lowercased name), and because every bound is ours to state:
//!
//! * compression pointers must point strictly backwards (so a chain of them always ends) and at
//!   most [`MAX_POINTER_HOPS`] are followed per name;
//! * a name is at most 255 octets on the wire, a label at most 63; label types other than plain
//!   and pointer (`0x40`, `0x80`) are rejected;
//! * counts in the header never size an allocation before the records are actually present.
//!
//! Names come out in presentation form, lowercased, with a trailing dot; a byte outside
//! `[a-z0-9-_]` is escaped (`\.`, `\DDD`) so that no crafted label can look like two labels to
//! the policy matcher.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Size of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE: usize = 255;
/// Compression pointers followed per name at most.
pub const MAX_POINTER_HOPS: usize = 32;

/// Response codes the proxy writes or reads.
pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;

    /// The mnemonic of an rcode, for logs.
    pub fn name(code: u8) -> &'static str {
        match code {
            NOERROR => "NOERROR",
            FORMERR => "FORMERR",
            SERVFAIL => "SERVFAIL",
            NXDOMAIN => "NXDOMAIN",
            NOTIMP => "NOTIMP",
            REFUSED => "REFUSED",
            _ => "OTHER",
        }
    }
}

/// Record types the proxy looks at.
pub mod rtype {
    pub const A: u16 = 1;
    pub const CNAME: u16 = 5;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;

    /// The mnemonic of a type, or its number.
    pub fn name(t: u16) -> String {
        match t {
            A => "A".into(),
            2 => "NS".into(),
            CNAME => "CNAME".into(),
            6 => "SOA".into(),
            12 => "PTR".into(),
            15 => "MX".into(),
            16 => "TXT".into(),
            AAAA => "AAAA".into(),
            33 => "SRV".into(),
            OPT => "OPT".into(),
            65 => "HTTPS".into(),
            255 => "ANY".into(),
            n => format!("TYPE{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The message ends inside `what`.
    Truncated { what: &'static str },
    /// A name longer than 255 octets.
    NameTooLong,
    /// A label type other than a plain label or a compression pointer.
    BadLabelType(u8),
    /// A compression pointer that does not point strictly backwards, or too many of them.
    BadPointer { offset: usize },
    /// A query must ask exactly one question (RFC 9619).
    QuestionCount(u16),
    /// A query was expected, a response came (or the other way round).
    WrongDirection,
    /// Bytes after the last record.
    TrailingBytes(usize),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Truncated { what } => write!(f, "message ends inside the {what}"),
            DnsError::NameTooLong => write!(f, "name longer than {MAX_NAME_WIRE} octets"),
            DnsError::BadLabelType(b) => write!(f, "unsupported label type 0x{b:02x}"),
            DnsError::BadPointer { offset } => write!(
                f,
                "compression pointer at offset {offset} does not point backwards to a name (or too many)"
            ),
            DnsError::QuestionCount(n) => write!(f, "{n} questions (exactly one is allowed)"),
            DnsError::WrongDirection => write!(f, "QR bit not as expected"),
            DnsError::TrailingBytes(n) => write!(f, "{n} bytes after the last record"),
        }
    }
}

impl std::error::Error for DnsError {}

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(msg: &[u8]) -> Result<Header, DnsError> {
        let h = msg
            .get(..HEADER_LEN)
            .ok_or(DnsError::Truncated { what: "header" })?;
        let w = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Ok(Header {
            id: w(0),
            flags: w(2),
            qdcount: w(4),
            ancount: w(6),
            nscount: w(8),
            arcount: w(10),
        })
    }
    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    pub fn truncated(&self) -> bool {
        self.flags & 0x0200 != 0
    }
    pub fn recursion_desired(&self) -> bool {
        self.flags & 0x0100 != 0
    }
    /// The low four bits of the rcode (the EDNS extension is not needed here).
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// A question: the name in presentation form (lowercase, trailing dot), type and class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// The EDNS0 OPT record's fields the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_payload_size: u16,
    pub dnssec_ok: bool,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub header: Header,
    pub question: Question,
    /// Offset just after the question section (the question's wire bytes are
    /// `msg[HEADER_LEN..question_end]`, original casing kept).
    pub question_end: usize,
    pub edns: Option<Edns>,
}

impl Query {
    /// Largest UDP answer the client accepts: its EDNS payload size, else 512.
    pub fn max_udp_answer(&self) -> usize {
        self.edns
            .map_or(512, |e| usize::from(e.udp_payload_size.max(512)))
    }
}

/// Record data the proxy understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub rtype: u16,
    pub ttl: u32,
    pub data: RData,
}

/// A parsed response: header, question (if any) and the answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub header: Header,
    pub question: Option<Question>,
    pub answers: Vec<Record>,
}

/// What an allowed answer teaches the FQDN cache: every A/AAAA reached from the question name
/// through the answer's CNAME chain, and the lowest TTL along the way (cnp-semantics §9.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub ttl: u32,
    /// The CNAME targets followed, in order.
    pub cnames: Vec<String>,
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DnsError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DnsError::Truncated { what })?;
        let s = self
            .msg
            .get(self.pos..end)
            .ok_or(DnsError::Truncated { what })?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DnsError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DnsError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn name(&mut self) -> Result<String, DnsError> {
        let (name, end) = read_name(self.msg, self.pos)?;
        self.pos = end;
        Ok(name)
    }
    fn question(&mut self) -> Result<Question, DnsError> {
        Ok(Question {
            name: self.name()?,
            qtype: self.u16("question")?,
            qclass: self.u16("question")?,
        })
    }
    /// One resource record; `want_data` decodes A/AAAA/CNAME data.
    fn record(&mut self, want_data: bool) -> Result<(Record, u16), DnsError> {
        let name = self.name()?;
        let rtype = self.u16("record header")?;
        let class = self.u16("record header")?;
        let ttl = self.u32("record header")?;
        let rdlen = usize::from(self.u16("record header")?);
        let start = self.pos;
        let rdata = self.take(rdlen, "record data")?;
        let data = match (want_data, rtype) {
            (true, rtype::A) if rdlen == 4 => {
                RData::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]))
            }
            (true, rtype::AAAA) if rdlen == 16 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(rdata);
                RData::Aaaa(Ipv6Addr::from(o))
            }
            (true, rtype::CNAME) => {
                let (target, end) = read_name(self.msg, start)?;
                if end != start + rdlen {
                    return Err(DnsError::Truncated { what: "CNAME data" });
                }
                RData::Cname(target)
            }
            _ => RData::Other,
        };
        Ok((
            Record {
                name,
                rtype,
                ttl,
                data,
            },
            class,
        ))
    }
}

fn push_label(out: &mut String, label: &[u8]) {
    for &b in label {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => out.push(char::from(b)),
            b'A'..=b'Z' => out.push(char::from(b.to_ascii_lowercase())),
            b'.' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            _ => {
                out.push('\\');
                out.push(char::from(b'0' + b / 100));
                out.push(char::from(b'0' + (b / 10) % 10));
                out.push(char::from(b'0' + b % 10));
            }
        }
    }
    out.push('.');
}

/// Reads the name at `start`; returns it and the offset after it (after the first pointer, if
/// any).
fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), DnsError> {
    let mut out = String::new();
    let mut pos = start;
    let mut end = None;
    let mut wire_len = 0usize;
    let mut hops = 0usize;
    // Pointers must go strictly below the lowest offset visited so far: that alone makes every
    // chain finite; the hop limit bounds the work. No name lives in the header, so a pointer
    // into it is refused too: its "name" would be the ID and flags, which change when we answer
    // (our refusal would then carry a different or unparsable question — found by the fuzzer).
    let mut floor = start;
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated { what: "name" })?;
        match len & 0xc0 {
            0x00 => {
                let len = usize::from(len);
                wire_len += len + 1;
                if wire_len > MAX_NAME_WIRE {
                    return Err(DnsError::NameTooLong);
                }
                if len == 0 {
                    if out.is_empty() {
                        out.push('.');
                    }
                    return Ok((out, end.unwrap_or(pos + 1)));
                }
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(DnsError::Truncated { what: "name" })?;
                push_label(&mut out, label);
                pos += 1 + len;
            }
            0xc0 => {
                let lo = *msg
                    .get(pos + 1)
                    .ok_or(DnsError::Truncated { what: "name" })?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, lo]));
                hops += 1;
                if target >= floor || target < HEADER_LEN || hops > MAX_POINTER_HOPS {
                    return Err(DnsError::BadPointer { offset: pos });
                }
                if end.is_none() {
                    end = Some(pos + 2);
                }
                floor = target;
                pos = target;
            }
            _ => return Err(DnsError::BadLabelType(len)),
        }
    }
}

/// Parses a query: exactly one question, then the records (checked for shape; the OPT record
/// read).
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    let header = Header::parse(msg)?;
    if header.is_response() {
        return Err(DnsError::WrongDirection);
    }
    if header.qdcount != 1 {
        return Err(DnsError::QuestionCount(header.qdcount));
    }
    let mut r = Reader {
        msg,
        pos: HEADER_LEN,
    };
    let question = r.question()?;
    let question_end = r.pos;
    let mut edns = None;
    let records = u32::from(header.ancount) + u32::from(header.nscount);
    for _ in 0..records {
        r.record(false)?;
    }
    for _ in 0..header.arcount {
        let (rec, class) = r.record(false)?;
        if rec.rtype == rtype::OPT {
            edns = Some(Edns {
                // The OPT record keeps the payload size in the class field and the DO bit in
                // the TTL field.
                udp_payload_size: class,
                dnssec_ok: rec.ttl & 0x8000 != 0,
            });
        }
    }
    if r.pos != msg.len() {
        return Err(DnsError::TrailingBytes(msg.len() - r.pos));
    }
    Ok(Query {
        header,
        question,
        question_end,
        edns,
    })
}

/// Parses a response's header, question and answer section (authority and additional records
/// are not needed and not read).
pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    let header = Header::parse(msg)?;
    if !header.is_response() {
        return Err(DnsError::WrongDirection);
    }
    let mut r = Reader {
        msg,
        pos: HEADER_LEN,
    };
    let question = match header.qdcount {
        0 => None,
        1 => Some(r.question()?),
        n => return Err(DnsError::QuestionCount(n)),
    };
    // A truncated (TC) response may stop anywhere: keep what parsed.
    let mut answers = Vec::new();
    for _ in 0..header.ancount {
        match r.record(true) {
            Ok((rec, _)) => answers.push(rec),
            Err(e) if header.truncated() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Response {
        header,
        question,
        answers,
    })
}

impl Response {
    /// The IPs an allowed NOERROR answer gives the asked name, through its CNAME chain. `None`
    /// when there is nothing to learn. Only records owned by a name on the chain count, so an
    /// unrelated record smuggled into the answer section teaches nothing.
    pub fn learned(&self) -> Option<Learned> {
        if self.header.rcode() != rcode::NOERROR {
            return None;
        }
        let q = self.question.as_ref()?;
        if q.qclass != 1 {
            return None;
        }
        let mut chain: Vec<&str> = vec![&q.name];
        let mut ttl = u32::MAX;
        // Follow CNAMEs in whatever order they appear; a chain can be at most as long as the
        // answer, which also stops loops.
        for _ in 0..self.answers.len() {
            let Some(last) = chain.last().copied() else {
                break;
            };
            let next = self.answers.iter().find_map(|rec| match &rec.data {
                RData::Cname(t) if rec.name == last => Some((t.as_str(), rec.ttl)),
                _ => None,
            });
            match next {
                Some((t, rttl)) if !chain.contains(&t) => {
                    ttl = ttl.min(rttl);
                    chain.push(t);
                }
                _ => break,
            }
        }
        let mut ips = Vec::new();
        for rec in &self.answers {
            let ip = match rec.data {
                RData::A(a) => IpAddr::V4(a),
                RData::Aaaa(a) => IpAddr::V6(a),
                _ => continue,
            };
            if chain.contains(&rec.name.as_str()) {
                ttl = ttl.min(rec.ttl);
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        if ips.is_empty() {
            return None;
        }
        Some(Learned {
            name: q.name.clone(),
            ips,
            ttl,
            cnames: chain[1..].iter().map(|s| s.to_string()).collect(),
        })
    }
}

/// The message ID, when the message is at least a header long.
pub fn message_id(msg: &[u8]) -> Option<u16> {
    msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Overwrites the message ID in place (no-op on a message shorter than two bytes).
pub fn set_message_id(msg: &mut [u8], id: u16) {
    if let Some(b) = msg.get_mut(..2) {
        b.copy_from_slice(&id.to_be_bytes());
    }
}

/// The question's name exactly as sent (original casing), for audit and logs of a query that
/// parsed.
pub fn question_wire<'m>(msg: &'m [u8], q: &Query) -> &'m [u8] {
    msg.get(HEADER_LEN..q.question_end).unwrap_or(&[])
}

/// A reply to `query` with `rcode` and no records: same ID, opcode, RD and question (original
/// casing); an EDNS query gets an OPT record back (RFC 6891 §6.1.1).
pub fn reply_with_rcode(msg: &[u8], query: &Query, code: u8) -> Vec<u8> {
    let q = question_wire(msg, query);
    let mut out = Vec::with_capacity(HEADER_LEN + q.len() + 11);
    out.extend_from_slice(&query.header.id.to_be_bytes());
    // QR, the query's opcode and RD, RA, rcode.
    let flags = 0x8000
        | (u16::from(query.header.opcode()) << 11)
        | (query.header.flags & 0x0100)
        | 0x0080
        | u16::from(code & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    let arcount: u16 = u16::from(query.edns.is_some());
    out.extend_from_slice(&arcount.to_be_bytes());
    out.extend_from_slice(q);
    if query.edns.is_some() {
        // Root name, type OPT, payload size 1232 (the DNS flag day value), no extended rcode,
        // no flags, no options.
        out.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    out
}

/// A minimal reply for a message that did not parse as a query but has a header: the ID echoed,
/// no question, `FORMERR`. `None` when there is not even a header (nothing to answer).
pub fn formerr(msg: &[u8]) -> Option<Vec<u8>> {
    let h = Header::parse(msg).ok()?;
    if h.is_response() {
        return None;
    }
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&h.id.to_be_bytes());
    let flags = 0x8000 | (h.flags & 0x7900) | u16::from(rcode::FORMERR);
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a name without compression.
    fn name(n: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in n.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        for c in counts {
            v.extend_from_slice(&c.to_be_bytes());
        }
        v
    }

    fn query(n: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = header(0x1234, 0x0100, [1, 0, 0, u16::from(edns.is_some())]);
        m.extend(name(n));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
        }
        m
    }

    fn rr(owner: &[u8], t: u16, ttl: u32, data: &[u8]) -> Vec<u8> {
        let mut v = owner.to_vec();
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&1u16.to_be_bytes());
        v.extend_from_slice(&ttl.to_be_bytes());
        v.extend_from_slice(&(data.len() as u16).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn query_with_edns_parses_name_lowercased_and_payload_size() {
        let m = query("WWW.Example.COM", rtype::AAAA, Some(4096));
        let q = parse_query(&m).unwrap();
        assert_eq!(q.question.name, "www.example.com.");
        assert_eq!(q.question.qtype, rtype::AAAA);
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_payload_size: 4096,
                dnssec_ok: true
            })
        );
        assert_eq!(q.max_udp_answer(), 4096);
        assert_eq!(q.header.id, 0x1234);
        assert!(q.header.recursion_desired());
    }

    #[test]
    fn query_without_edns_allows_512_bytes() {
        let q = parse_query(&query("a.b", rtype::A, None)).unwrap();
        assert_eq!(q.edns, None);
        assert_eq!(q.max_udp_answer(), 512);
    }

    #[test]
    fn root_query_is_a_single_dot() {
        let q = parse_query(&query(".", 2, None)).unwrap();
        assert_eq!(q.question.name, ".");
    }

    #[test]
    fn odd_bytes_in_labels_are_escaped_so_they_cannot_fake_a_label_boundary() {
        let mut m = header(1, 0, [1, 0, 0, 0]);
        m.extend_from_slice(&[
            5, b'a', b'.', b'B', 0, b' ', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1,
        ]);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.question.name, "a\\.b\\000\\032.com.");
    }

    #[test]
    fn queries_must_ask_exactly_one_question() {
        let mut m = query("a.b", 1, None);
        m[5] = 2;
        assert_eq!(parse_query(&m), Err(DnsError::QuestionCount(2)));
        m[5] = 0;
        assert_eq!(parse_query(&m), Err(DnsError::QuestionCount(0)));
    }

    #[test]
    fn responses_are_not_queries_and_trailing_bytes_are_refused() {
        let mut m = query("a.b", 1, None);
        m[2] |= 0x80;
        assert_eq!(parse_query(&m), Err(DnsError::WrongDirection));
        let mut m = query("a.b", 1, None);
        m.push(0);
        assert_eq!(parse_query(&m), Err(DnsError::TrailingBytes(1)));
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_rejected() {
        // Question name is a pointer to itself.
        let mut m = header(1, 0, [1, 0, 0, 0]);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::BadPointer { offset: 12 }));
        // Two labels pointing at each other: the second points forward.
        let mut m = header(1, 0, [1, 0, 0, 0]);
        m.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse_query(&m), Err(DnsError::BadPointer { .. })));
    }

    #[test]
    fn pointers_into_the_header_are_rejected() {
        // ID 0x0161 and flags 0x0100 read as the labels "a" and "\000" when the question points
        // at offset 0; our reply's flags (0x81..) would no longer read as a name.
        let mut m = header(0x0161, 0x0100, [1, 0, 0, 0]);
        m.extend_from_slice(&[0xc0, 0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::BadPointer { offset: 12 }));
    }

    #[test]
    fn long_names_and_reserved_label_types_are_rejected() {
        let mut m = header(1, 0, [1, 0, 0, 0]);
        for _ in 0..5 {
            m.push(63);
            m.extend(std::iter::repeat_n(b'a', 63));
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::NameTooLong));
        let mut m = header(1, 0, [1, 0, 0, 0]);
        m.extend_from_slice(&[0x41, 0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&m), Err(DnsError::BadLabelType(0x41)));
    }

    #[test]
    fn truncated_messages_say_where() {
        let m = query("example.com", 1, Some(1232));
        for cut in 0..m.len() {
            assert!(parse_query(&m[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// www.example.com CNAME edge.cdn.net (ttl 300), edge.cdn.net CNAME e1.cdn.net (ttl 60),
    /// e1.cdn.net A 192.0.2.1 / 192.0.2.2 (ttl 120), plus an unrelated A for other.net.
    fn cname_chain_response() -> Vec<u8> {
        let mut m = header(7, 0x8180, [1, 5, 0, 0]);
        m.extend(name("www.example.com"));
        m.extend_from_slice(&[0, 1, 0, 1]);
        // Owner names as compression pointers to offset 12 (the question name).
        let edge = name("edge.cdn.net");
        m.extend(rr(&[0xc0, 12], rtype::CNAME, 300, &edge));
        let edge_off = m.len() - edge.len();
        let mut e1 = vec![2, b'e', b'1'];
        e1.extend_from_slice(&[0xc0, (edge_off + 5) as u8]); // "e1" + pointer to "cdn.net"
        m.extend(rr(&[0xc0, edge_off as u8], rtype::CNAME, 60, &e1));
        let e1_off = m.len() - e1.len();
        m.extend(rr(&[0xc0, e1_off as u8], rtype::A, 120, &[192, 0, 2, 1]));
        m.extend(rr(&[0xc0, e1_off as u8], rtype::A, 120, &[192, 0, 2, 2]));
        m.extend(rr(&name("other.net"), rtype::A, 5, &[198, 51, 100, 9]));
        m
    }

    #[test]
    fn cname_chain_is_followed_with_the_lowest_ttl_and_unrelated_records_ignored() {
        let r = parse_response(&cname_chain_response()).unwrap();
        assert_eq!(r.answers.len(), 5);
        assert_eq!(r.answers[1].name, "edge.cdn.net.");
        assert_eq!(r.answers[1].data, RData::Cname("e1.cdn.net.".into()));
        let l = r.learned().unwrap();
        assert_eq!(l.name, "www.example.com.");
        assert_eq!(
            l.ips,
            vec![IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2])]
        );
        assert_eq!(l.ttl, 60);
        assert_eq!(l.cnames, vec!["edge.cdn.net.", "e1.cdn.net."]);
    }

    #[test]
    fn nxdomain_and_empty_answers_teach_nothing() {
        let mut m = cname_chain_response();
        m[3] = 0x83;
        assert_eq!(parse_response(&m).unwrap().learned(), None);
        let mut m = header(7, 0x8180, [1, 0, 0, 0]);
        m.extend(name("www.example.com"));
        m.extend_from_slice(&[0, 1, 0, 1]);
        assert_eq!(parse_response(&m).unwrap().learned(), None);
    }

    #[test]
    fn aaaa_records_are_learned() {
        let mut m = header(7, 0x8180, [1, 1, 0, 0]);
        m.extend(name("v6.test"));
        m.extend_from_slice(&[0, 28, 0, 1]);
        let ip: Ipv6Addr = "2001:db8::7".parse().unwrap();
        m.extend(rr(&[0xc0, 12], rtype::AAAA, 30, &ip.octets()));
        let l = parse_response(&m).unwrap().learned().unwrap();
        assert_eq!(l.ips, vec![IpAddr::V6(ip)]);
        assert_eq!(l.ttl, 30);
    }

    #[test]
    fn refusal_keeps_id_question_casing_rd_and_edns() {
        let m = query("Api.Example.com", rtype::A, Some(4096));
        let q = parse_query(&m).unwrap();
        let r = reply_with_rcode(&m, &q, rcode::REFUSED);
        let h = Header::parse(&r).unwrap();
        assert_eq!(h.id, 0x1234);
        assert!(h.is_response());
        assert!(h.recursion_desired());
        assert_eq!(h.rcode(), rcode::REFUSED);
        assert_eq!((h.qdcount, h.ancount, h.nscount, h.arcount), (1, 0, 0, 1));
        assert_eq!(
            &r[HEADER_LEN..q.question_end],
            &m[HEADER_LEN..q.question_end]
        );
        let parsed = parse_response(&r).unwrap();
        assert_eq!(parsed.question.unwrap().name, "api.example.com.");
        let plain = query("a.b", 1, None);
        let pq = parse_query(&plain).unwrap();
        let r = reply_with_rcode(&plain, &pq, rcode::NXDOMAIN);
        assert_eq!(Header::parse(&r).unwrap().arcount, 0);
        assert_eq!(r.len(), q_len(&plain));
    }

    fn q_len(m: &[u8]) -> usize {
        parse_query(m).unwrap().question_end
    }

    #[test]
    fn formerr_echoes_the_id_and_ignores_responses_and_runts() {
        let mut m = query("a.b", 1, None);
        m[5] = 3;
        let r = formerr(&m).unwrap();
        assert_eq!(message_id(&r), Some(0x1234));
        assert_eq!(Header::parse(&r).unwrap().rcode(), rcode::FORMERR);
        assert_eq!(formerr(&m[..5]), None);
        m[2] |= 0x80;
        assert_eq!(formerr(&m), None);
    }

    #[test]
    fn message_id_rewrite_in_place() {
        let mut m = query("a.b", 1, None);
        set_message_id(&mut m, 0xbeef);
        assert_eq!(message_id(&m), Some(0xbeef));
        assert_eq!(parse_query(&m).unwrap().header.id, 0xbeef);
        let mut short = [1u8];
        set_message_id(&mut short, 7);
        assert_eq!(short, [1]);
    }

    #[test]
    fn truncated_response_keeps_the_records_that_parsed() {
        let mut m = cname_chain_response();
        m[2] |= 0x02; // TC
        m.truncate(m.len() - 3);
        let r = parse_response(&m).unwrap();
        assert!(r.header.truncated());
        assert_eq!(r.answers.len(), 4);
        let mut m = cname_chain_response();
        m.truncate(m.len() - 3);
        assert!(parse_response(&m).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok(q) = parse_query(&data) {
                let r = reply_with_rcode(&data, &q, rcode::REFUSED);
                proptest::prop_assert!(parse_response(&r).is_ok());
            }
            let _ = formerr(&data);
            if let Ok(r) = parse_response(&data) {
                let _ = r.learned();
            }
        }
    }
}
