//! The subset of HTTP/1.1 the control API speaks, as pure functions over
//! byte buffers: parsing a request (with strict size limits), writing a
//! response, and the client's side of both.
//!
//! One request per connection: every response carries `Connection: close`.
//! Bodies must come with `Content-Length`; chunked transfer coding is
//! refused. `Expect: 100-continue` is honoured (curl sends it for larger
//! bodies).

use serde::Serialize;

use super::ErrorBody;

/// Most bytes in a request's head (request line and headers, with the
/// blank line that ends them).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most bytes in a request's body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most header fields in a request.
pub const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// "GET", "PUT", ... (case-sensitive, as HTTP methods are).
    pub method: String,
    /// The path of the request target, without any query string.
    pub path: String,
    /// The body (empty if none was sent).
    pub body: Vec<u8>,
}

/// What [`parse_request`] made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `awaits_continue`: the head is complete and
    /// the client waits for `100 Continue` before it sends the body.
    Partial {
        /// Send [`CONTINUE`] (once) before reading on.
        awaits_continue: bool,
    },
    /// A whole request. Bytes after it are ignored.
    Complete(Request),
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a request (or, for the client, a response) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Not HTTP/1.x, or broken in a way without a more precise status.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The head exceeds [`MAX_HEAD_BYTES`] or has too many fields.
    #[error(
        "request head too large: at most {MAX_HEAD_BYTES} bytes and {MAX_HEADERS} header fields"
    )]
    HeadTooLarge,
    /// `Content-Length` exceeds [`MAX_BODY_BYTES`].
    #[error("request body of {0} bytes too large: at most {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
    /// A transfer coding (chunked) instead of `Content-Length`.
    #[error("Transfer-Encoding is not supported: send the body with Content-Length")]
    TransferEncoding,
    /// An HTTP version other than 1.0 and 1.1.
    #[error("unsupported HTTP version: only HTTP/1.1 (and 1.0) are spoken here")]
    Version,
    /// The client closed the connection before the request was complete.
    #[error("incomplete request: the connection was closed before the request ended")]
    Truncated,
    /// The client did not send the whole request in time.
    #[error("request timed out: the whole request must arrive within {0} s")]
    Timeout(u64),
}

impl HttpError {
    /// The response status for this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::Truncated => 400,
            HttpError::Timeout(_) => 408,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::HeadTooLarge => 431,
            HttpError::TransferEncoding => 501,
            HttpError::Version => 505,
        }
    }

    /// The error response for this error.
    pub fn response(&self) -> Response {
        Response::error(self.status(), self.to_string())
    }
}

/// Parses the request at the start of `buf`: a complete request, a request
/// that needs more bytes, or an error. Calling it again with more bytes
/// appended is how a reader makes progress; it never needs more than
/// [`MAX_HEAD_BYTES`] + [`MAX_BODY_BYTES`] bytes.
pub fn parse_request(buf: &[u8]) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => n,
        Ok(httparse::Status::Complete(_)) => return Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => {
            return Ok(Parsed::Partial {
                awaits_continue: false,
            });
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(HttpError::Version),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed("no request line".into()));
    };
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "request target '{target}' is not a path starting with '/'"
        )));
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);

    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = parse_content_length(h.value)?;
            if content_length.is_some_and(|v| v != value) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if h.name.eq_ignore_ascii_case("expect") {
            if h.value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(HttpError::Malformed(format!(
                    "unsupported Expect header '{}'",
                    String::from_utf8_lossy(h.value)
                )));
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge(body_len));
    }
    // At most MAX_BODY_BYTES, so it fits.
    let body_len = body_len as usize;
    let rest = &buf[head_len..];
    if rest.len() < body_len {
        return Ok(Parsed::Partial {
            awaits_continue: expect_continue && rest.is_empty(),
        });
    }
    Ok(Parsed::Complete(Request {
        method: method.to_string(),
        path: path.to_string(),
        body: rest[..body_len].to_vec(),
    }))
}

/// A Content-Length value: decimal digits only (no sign, no spaces inside).
fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    let bad = || {
        HttpError::Malformed(format!(
            "invalid Content-Length '{}'",
            String::from_utf8_lossy(value)
        ))
    };
    let text = std::str::from_utf8(value).map_err(|_| bad())?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // All digits: the only failure left is overflow, which is too large.
    Ok(text.parse().unwrap_or(u64::MAX))
}

/// A response: status, optional JSON body, and an `Allow` header for 405.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// A JSON document, or empty for no body.
    pub body: Vec<u8>,
    /// The methods the path allows (for 405).
    pub allow: Option<String>,
}

impl Response {
    /// A response without a body (e.g. 204).
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            body: Vec::new(),
            allow: None,
        }
    }

    /// A response whose body is `value` as JSON.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                body,
                allow: None,
            },
            Err(e) => Response::error(500, format!("cannot encode the response: {e}")),
        }
    }

    /// An error response: `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        let body = ErrorBody {
            error: message.into(),
        };
        Response {
            status,
            // A struct of one string always serializes.
            body: serde_json::to_vec(&body).unwrap_or_default(),
            allow: None,
        }
    }

    /// The response as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        // 204 and 1xx responses carry no body and no Content-Length.
        if self.status != 204 && self.status >= 200 {
            if !self.body.is_empty() {
                head.push_str("Content-Type: application/json\r\n");
            }
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// The reason phrase of the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A request as the client sends it. `body`, if any, is JSON.
pub fn request_bytes(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let body = body.unwrap_or_default();
    let mut bytes =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if !body.is_empty() {
        bytes.push_str("Content-Type: application/json\r\n");
    }
    bytes.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = bytes.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A response as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// Parses `buf`, everything the server sent before it closed the
/// connection. Interim (1xx) responses are skipped. The body is what
/// `Content-Length` says, or everything after the head without it.
pub fn parse_response(mut buf: &[u8]) -> Result<ClientResponse, HttpError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(HttpError::Malformed(
                    "the response ended before its head was complete".into(),
                ));
            }
            Err(e) => return Err(HttpError::Malformed(format!("bad response: {e}"))),
        };
        let status = resp
            .code
            .ok_or_else(|| HttpError::Malformed("bad response: no status".into()))?;
        let rest = &buf[head_len..];
        if (100..200).contains(&status) {
            buf = rest;
            continue;
        }
        let mut body = rest;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = parse_content_length(h.value)?;
                match usize::try_from(n) {
                    Ok(n) if n <= rest.len() => body = &rest[..n],
                    _ => {
                        return Err(HttpError::Malformed(format!(
                            "the response body ended after {} of {n} bytes",
                            rest.len()
                        )));
                    }
                }
            }
        }
        return Ok(ClientResponse {
            status,
            body: body.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> Request {
        match parse_request(buf) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn error(buf: &[u8]) -> HttpError {
        match parse_request(buf) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn partial(buf: &[u8]) -> bool {
        match parse_request(buf) {
            Ok(Parsed::Partial { awaits_continue }) => awaits_continue,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn get_without_body() {
        let r = complete(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/vm");
        assert!(r.body.is_empty());
    }

    #[test]
    fn put_with_body_and_query() {
        let r = complete(
            b"PUT /vm/pause?verbose=1 HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}trailing garbage",
        );
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/vm/pause");
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn http_1_0_and_bare_newlines_are_accepted() {
        let r = complete(b"GET /vm HTTP/1.0\n\n");
        assert_eq!(r.path, "/vm");
    }

    #[test]
    fn truncated_requests_need_more_bytes() {
        let full: &[u8] = b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":";
        assert!(!partial(b""));
        for n in 1..full.len() {
            assert!(!partial(&full[..n]), "prefix of {n} bytes");
        }
        assert_eq!(complete(full).body, b"{\"a\":");
        // Bytes past Content-Length are not part of the body.
        let mut more = full.to_vec();
        more.extend_from_slice(b"1}");
        assert_eq!(complete(&more).body, b"{\"a\":");
    }

    #[test]
    fn expect_continue_is_reported_once_the_head_is_complete() {
        let head: &[u8] =
            b"PUT /vm/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert!(!partial(&head[..head.len() - 1]));
        assert!(partial(head));
        let mut some_body = head.to_vec();
        some_body.push(b'{');
        assert!(!partial(&some_body));
        some_body.push(b'}');
        assert_eq!(complete(&some_body).body, b"{}");
        assert!(matches!(
            error(b"PUT /vm/x HTTP/1.1\r\nExpect: something\r\n\r\n"),
            HttpError::Malformed(_)
        ));
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut big = b"GET /vm HTTP/1.1\r\nX-Filler: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(error(&big), HttpError::HeadTooLarge);
        // Complete but too long.
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(error(&big), HttpError::HeadTooLarge);
        // A head exactly at the limit is fine.
        let mut exact = b"GET /vm HTTP/1.1\r\nX-Filler: ".to_vec();
        exact.resize(MAX_HEAD_BYTES - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(complete(&exact).path, "/vm");
        // Too many fields.
        let mut many = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(error(&many), HttpError::HeadTooLarge);
        // Endless garbage without a line end.
        assert_eq!(error(&[b'A'; MAX_HEAD_BYTES + 1]), HttpError::HeadTooLarge);
    }

    #[test]
    fn oversized_bodies_are_refused_before_they_arrive() {
        let too_big = MAX_BODY_BYTES + 1;
        let head = format!("PUT /vm/pause HTTP/1.1\r\nContent-Length: {too_big}\r\n\r\n");
        assert_eq!(
            error(head.as_bytes()),
            HttpError::BodyTooLarge(too_big as u64)
        );
        assert_eq!(
            error(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            HttpError::BodyTooLarge(u64::MAX)
        );
        let at_limit = format!("PUT /x HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
        let mut buf = at_limit.into_bytes();
        buf.resize(buf.len() + MAX_BODY_BYTES, b' ');
        assert_eq!(complete(&buf).body.len(), MAX_BODY_BYTES);
    }

    #[test]
    fn bad_content_length_and_transfer_encoding() {
        for bad in ["-1", "1.5", "", "0x10", "1 2", "+3"] {
            let req = format!("PUT /vm HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(error(req.as_bytes()), HttpError::Malformed(_)),
                "{bad}"
            );
        }
        assert!(matches!(
            error(b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            HttpError::Malformed(_)
        ));
        // The same value twice is harmless.
        let r = complete(b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na");
        assert_eq!(r.body, b"a");
        assert_eq!(
            error(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
            HttpError::TransferEncoding
        );
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            &b"\x00\x01\x02\x03\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /vm\r\n\r\n",
            b"GET /vm HTTP/1.1 extra\r\n\r\n",
            b"G(T /vm HTTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET http://host/vm HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
        ] {
            let e = error(bad);
            assert_eq!(e.status(), 400, "{:?}: {e:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(error(b"GET /vm HTTP/2.0\r\n\r\n"), HttpError::Version);
        assert_eq!(error(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").status(), 505);
    }

    #[test]
    fn any_method_token_parses_for_the_router_to_judge() {
        let r = complete(b"BREW /vm HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, "BREW");
    }

    #[test]
    fn responses_are_written_with_length_and_close() {
        let r = Response::json(200, &serde_json::json!({"a": 1}));
        assert_eq!(
            r.to_bytes(),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{\"a\":1}"
        );
        assert_eq!(
            Response::empty(204).to_bytes(),
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
        let mut r = Response::error(405, "no");
        r.allow = Some("GET".into());
        let text = String::from_utf8(r.to_bytes()).expect("ASCII");
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n{\"error\":\"no\"}"), "{text}");
    }

    #[test]
    fn http_errors_become_json_error_responses() {
        let r = HttpError::BodyTooLarge(70000).response();
        assert_eq!(r.status, 413);
        let body: ErrorBody = serde_json::from_slice(&r.body).expect("JSON");
        assert!(body.error.contains("70000"), "{}", body.error);
    }

    #[test]
    fn client_round_trip() {
        let req = request_bytes("PUT", "/vm/pause", Some(b"{}"));
        let parsed = complete(&req);
        assert_eq!(
            parsed,
            Request {
                method: "PUT".into(),
                path: "/vm/pause".into(),
                body: b"{}".to_vec(),
            }
        );
        let resp = Response::error(409, "busy").to_bytes();
        let back = parse_response(&resp).expect("parses");
        assert_eq!(back.status, 409);
        assert_eq!(back.body, b"{\"error\":\"busy\"}");
        let back = parse_response(&Response::empty(204).to_bytes()).expect("parses");
        assert_eq!((back.status, back.body.len()), (204, 0));
    }

    #[test]
    fn client_skips_interim_responses_and_checks_lengths() {
        let mut buf = CONTINUE.to_vec();
        buf.extend_from_slice(&Response::empty(202).to_bytes());
        assert_eq!(parse_response(&buf).expect("parses").status, 202);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le").is_err());
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        // Without Content-Length the body runs to the end.
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\n{}").expect("parses");
        assert_eq!(r.body, b"{}");
    }
}
