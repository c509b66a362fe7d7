//! The operator CLI's client side: talks to a node's HTTP API.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// GETs `path` from the API at `base` and returns the JSON body, whatever the status.
pub async fn get_json(base: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid API URL {url}"))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .with_context(|| format!("{url}: no answer within 5 s"))?
        .with_context(|| format!("{url}: request failed"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{url}: reading body"))?
        .to_bytes();
    let value =
        serde_json::from_slice(&body).with_context(|| format!("{url}: answer is not JSON"))?;
    Ok((status, value))
}

/// `pgha list`: the members as a table (or the JSON array).
pub async fn list(api: &str, json: bool) -> anyhow::Result<String> {
    let (status, cluster) = get_json(api, "/cluster").await?;
    if status != 200 {
        bail!("{api}/cluster answered {status}: {cluster}");
    }
    let members = cluster["members"].as_array().cloned().unwrap_or_default();
    if json {
        return Ok(serde_json::to_string_pretty(&members)?);
    }
    let mut rows = vec![["Member", "Host", "Role", "State", "TL", "Lag (bytes)"]
        .map(String::from)
        .to_vec()];
    for m in &members {
        let mut state = m["state"].as_str().unwrap_or("").to_string();
        if let (Some(done), Some(total)) = (
            m["basebackup"]["done_bytes"].as_u64(),
            m["basebackup"]["total_bytes"].as_u64(),
        ) {
            state = format!("{state} {}/{} MiB", done >> 20, total >> 20);
        }
        let role = match (m["leader"].as_bool(), m["role"].as_str()) {
            (Some(true), Some("primary")) => "Leader".to_string(),
            (_, Some("replica")) => "Replica".to_string(),
            (_, Some(r)) => r.to_string(),
            _ => String::new(),
        };
        let opt = |v: &Value| {
            if v.is_null() {
                String::new()
            } else {
                v.to_string()
            }
        };
        rows.push(vec![
            m["name"].as_str().unwrap_or("").to_string(),
            m["host"].as_str().unwrap_or("").to_string(),
            role,
            state,
            opt(&m["timeline"]),
            opt(&m["lag_bytes"]),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let sep: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = format!(
        "Cluster: {} (leader: {})\n",
        cluster["scope"].as_str().unwrap_or("?"),
        cluster["leader"].as_str().unwrap_or("none")
    );
    out.push_str(&sep);
    for (i, r) in rows.iter().enumerate() {
        for (c, cell) in r.iter().enumerate() {
            out.push_str(&format!("| {:<w$} ", cell, w = widths[c]));
        }
        out.push_str("|\n");
        if i == 0 {
            out.push_str(&sep);
        }
    }
    out.push_str(&sep);
    Ok(out)
}
