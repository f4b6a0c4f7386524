//! GETs of lessor's admin endpoints with a real HTTP client (reqwest), not
//! one of lessor's own.

use std::io;

/// An admin endpoint's answer.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: String,
}

/// `GET http://{addr}{path}`, with `Accept: {accept}` when given.
pub async fn fetch(addr: &str, path: &str, accept: Option<&str>) -> io::Result<Fetched> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(io::Error::other)?;
    let mut request = client.get(format!("http://{addr}{path}"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.map_err(io::Error::other)?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.map_err(io::Error::other)?;
    Ok(Fetched {
        status,
        content_type,
        body,
    })
}
