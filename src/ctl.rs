//! The operator CLI's client side: talks to a node's HTTP API.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A client for http:// and https:// API URLs; https:// is verified with
/// the CA given by `--cacert` (or the node's config), see [`crate::tls::https`].
/// Connections go through the Happy Eyeballs connector of [`crate::net`].
fn client<B>() -> Client<hyper_rustls::HttpsConnector<HttpConnector<crate::net::Resolver>>, B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    let mut tcp = crate::net::http_connector();
    tcp.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*crate::tls::https::client_config()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new()).build(https)
}

/// An https:// URL without a CA to verify it cannot work: say so up front.
fn check_trust(url: &str) -> anyhow::Result<()> {
    if url.starts_with("https://") && !crate::tls::https::client_trust_configured() {
        bail!("{url}: an https:// API needs the cluster CA: pass --cacert FILE (or --config FILE of a node with a shared CA)");
    }
    Ok(())
}

/// GETs `path` from the API at `base` and returns the JSON body, whatever the status.
pub async fn get_json(base: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid API URL {url}"))?;
    check_trust(&url)?;
    let client: Client<_, Empty<Bytes>> = client();
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
    let pending = members.iter().any(|m| m["pending_restart"] == true);
    let routed = members.iter().any(|m| m["router_rw"].is_string());
    let mut header = ["Member", "Host", "Role", "State", "TL", "Lag (bytes)"]
        .map(String::from)
        .to_vec();
    if routed {
        header.push("Router (rw / ro)".into());
    }
    if pending {
        header.push("Pending restart".into());
    }
    let mut rows = vec![header];
    for m in &members {
        let mut state = m["state"].as_str().unwrap_or("").to_string();
        if let (Some(done), Some(total)) = (
            m["basebackup"]["done_bytes"].as_u64(),
            m["basebackup"]["total_bytes"].as_u64(),
        ) {
            state = format!("{state} {}/{} MiB", done >> 20, total >> 20);
        }
        let quorum = cluster["synchronous_mode"] == "quorum";
        let role = match (m["leader"].as_bool(), m["role"].as_str()) {
            (Some(true), Some("primary")) => "Leader".to_string(),
            (_, Some("replica")) if m["sync_standby"] == true && quorum => {
                "Quorum Standby".to_string()
            }
            (_, Some("replica")) if m["sync_standby"] == true => "Sync Standby".to_string(),
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
        let mut row = vec![
            m["name"].as_str().unwrap_or("").to_string(),
            m["host"].as_str().unwrap_or("").to_string(),
            role,
            state,
            opt(&m["timeline"]),
            opt(&m["lag_bytes"]),
        ];
        if routed {
            let listeners: Vec<&str> = [&m["router_rw"], &m["router_ro"]]
                .into_iter()
                .filter_map(Value::as_str)
                .collect();
            row.push(listeners.join(" / "));
        }
        if pending {
            row.push(
                if m["pending_restart"] == true {
                    "*"
                } else {
                    ""
                }
                .into(),
            );
        }
        rows.push(row);
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
    for m in &members {
        if let Some(secs) = m["archiver"]["failing_for_s"].as_u64() {
            out.push_str(&format!(
                "Warning: {}: WAL archiving failing for {secs} s (last failed segment {}); see its log\n",
                m["name"].as_str().unwrap_or("?"),
                m["archiver"]["last_failed_wal"].as_str().unwrap_or("?")
            ));
        }
    }
    if cluster["dcs_reachable"] == false {
        out.push_str(&format!(
            "Warning: {api} cannot read etcd now; this is its view as of its last successful read.\n"
        ));
    }
    if let Some(sw) = cluster["scheduled_switchover"].as_object() {
        let to = sw
            .get("to")
            .and_then(Value::as_str)
            .unwrap_or("the best healthy replica");
        let at = sw.get("at").and_then(Value::as_str).unwrap_or("now");
        let from = sw.get("from").and_then(Value::as_str).unwrap_or("?");
        out.push_str(&format!(
            "Switchover pending: {from} -> {to} at {at} (cancel: pgha switchover --cancel)\n"
        ));
    }
    if let Some(mode) = cluster["synchronous_mode"].as_str().filter(|m| *m != "off") {
        let quorum = cluster["sync"]["quorum"].as_u64().unwrap_or(0);
        let names: Vec<&str> = cluster["sync"]["members"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let detail = if quorum == 0 {
            "no standby holds every acknowledged commit: asynchronous fallback, no automatic failover"
                .to_string()
        } else {
            format!(
                "every acknowledged commit is on {quorum} of [{}]",
                names.join(", ")
            )
        };
        out.push_str(&format!("Synchronous mode: {mode}; {detail}\n"));
    }
    Ok(out)
}

/// Sends an operator request and returns the status and JSON answer.
pub async fn send(
    base: &str,
    method: hyper::Method,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    use http_body_util::Full;
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid API URL {url}"))?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = req
        .body(Full::new(payload))
        .context("building the request")?;
    check_trust(&url)?;
    let client: Client<_, Full<Bytes>> = client();
    let resp = tokio::time::timeout(Duration::from_secs(130), client.request(req))
        .await
        .with_context(|| format!("{url}: no answer within 130 s"))?
        .with_context(|| format!("{url}: request failed"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{url}: reading body"))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

/// The name of the cluster's leader now, as any member's `/cluster` has it.
pub async fn current_leader(base: &str) -> anyhow::Result<String> {
    let (status, cluster) = get_json(base, "/cluster").await?;
    if status != 200 {
        bail!("{base}/cluster answered {status}: {cluster}");
    }
    cluster["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["leader"] == true))
        .and_then(|m| m["name"].as_str())
        .map(str::to_string)
        .context("the cluster has no leader now: nothing to switch over from (use failover)")
}

/// The API URL of member `name`, found through any member's `/cluster`.
pub async fn member_api(base: &str, name: &str) -> anyhow::Result<String> {
    let (_, cluster) = get_json(base, "/cluster").await?;
    cluster["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .and_then(|m| m["api_url"].as_str())
        .map(str::to_string)
        .with_context(|| format!("no member named {name} in the cluster"))
}

/// `KEY=VALUE` pairs as a JSON merge patch; values parse as JSON when they
/// can (numbers, booleans, null), else they are strings. `parameters.NAME`
/// addresses one Postgres parameter.
pub fn config_patch(pairs: &[String]) -> anyhow::Result<Value> {
    let mut patch = serde_json::Map::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("{pair}: expected KEY=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        match k.trim().split_once('.') {
            Some((section, name)) if !name.is_empty() => {
                let entry = patch
                    .entry(section.to_string())
                    .or_insert_with(|| Value::Object(Default::default()));
                let Value::Object(inner) = entry else {
                    anyhow::bail!("{pair}: {section} is set both as a whole and by key");
                };
                inner.insert(name.to_string(), value);
            }
            _ => {
                patch.insert(k.trim().to_string(), value);
            }
        }
    }
    Ok(Value::Object(patch))
}

/// `pgha history`: one line per leadership change.
pub fn render_history(history: &Value) -> String {
    let mut out =
        String::from("Time (UTC)               Kind        TL  From -> To       Reason\n");
    for h in history.as_array().into_iter().flatten() {
        let at = h["at_ms"].as_u64().unwrap_or(0);
        let time = crate::clock::rfc3339_ms(at);
        out.push_str(&format!(
            "{time}  {:<10}  {:<3} {} -> {}  {}\n",
            h["kind"].as_str().unwrap_or("failover"),
            h["timeline"]
                .as_u64()
                .map(|t| t.to_string())
                .unwrap_or_default(),
            h["old_leader"].as_str().unwrap_or("?"),
            h["new_leader"].as_str().unwrap_or("?"),
            h["reason"].as_str().unwrap_or(""),
        ));
    }
    out
}
