//! Fuzzes what the API server does with a parsed request: routing and the JSON bodies
//! of every endpoint (`mempower_api::dispatch`). The first byte picks a method, the
//! next a route template whose `{name}` segments take fuzzed text, and the rest is
//! the body, so inputs reach every handler's body parser.
//!
//! Invariants:
//! - no panic;
//! - a request answered by the server itself is a 4xx with a JSON `{"error": ...}`
//!   body, and 405 carries `Allow`;
//! - an action is only produced for a well-formed body: evacuations name at least one
//!   region, compactions ask for more than 0 bytes, and the ids in the action are the
//!   numbers in the path;
//! - a region list's query (the fuzzed text, for odd third bytes) reads back the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mempower_api::http::Headers;
use mempower_api::{dispatch, ApiAction, Method, Request};

const METHODS: [Method; 5] = [
    Method::Get,
    Method::Post,
    Method::Put,
    Method::Delete,
    Method::Patch,
];
const PATHS: [&str; 14] = [
    "/api/v1/vm",
    "/api/v1/vm/shutdown",
    "/api/v1/nodes",
    "/api/v1/nodes/{}/regions",
    "/api/v1/nodes/{}/requested-size",
    "/api/v1/nodes/{}/evacuations",
    "/api/v1/nodes/{}/compact",
    "/api/v1/nodes/{}/regions/{}/plug",
    "/api/v1/evacuations",
    "/api/v1/evacuations/{}",
    "/api/v1/agent",
    "/api/v1/agent/call",
    "/metrics",
    "/api/v1/balloon",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let method = METHODS[data[0] as usize % METHODS.len()];
    let template = PATHS[data[1] as usize % PATHS.len()];
    // Path parameters: short pieces of the input, without '/' or '?'.
    let split = (data[2] as usize % 24).min(data.len() - 3);
    let param: String = String::from_utf8_lossy(&data[3..3 + split])
        .chars()
        .filter(|c| *c != '/' && *c != '?' && !c.is_whitespace())
        .collect();
    let param = if param.is_empty() {
        "0".to_string()
    } else {
        param
    };
    let path = template.replace("{}", &param);
    // An odd third byte also gives the fuzzed text as the query.
    let query = if data[2] % 2 == 1 {
        param.replace('#', "")
    } else {
        String::new()
    };
    let body = data[3 + split..].to_vec();
    let request = Request {
        method,
        path,
        query,
        headers: Headers::new(),
        body,
    };
    match dispatch(&request) {
        Err(response) => {
            assert!((400..500).contains(&response.status), "{}", response.status);
            assert!(response.error_message().is_some(), "an error body");
            if response.status == 405 {
                assert!(response.header("allow").is_some());
            }
        }
        Ok(action) => {
            let number = param.parse::<u64>().ok();
            match action {
                ApiAction::Evacuate { node, regions, .. } => {
                    assert!(!regions.is_empty());
                    assert_eq!(Some(u64::from(node)), number);
                }
                ApiAction::Compact {
                    node,
                    release_bytes,
                    ..
                } => {
                    assert!(release_bytes > 0);
                    assert_eq!(Some(u64::from(node)), number);
                }
                ApiAction::GetJob { id } => assert_eq!(Some(id), number),
                ApiAction::PlugRegion { node, region } => {
                    assert_eq!(Some(u64::from(node)), number);
                    assert_eq!(Some(u64::from(region)), number);
                }
                ApiAction::GetRegions { node, query } => {
                    assert_eq!(Some(u64::from(node)), number);
                    let again = mempower_api::RegionQuery::parse(&query.to_query_string());
                    assert_eq!(again, Ok(query), "a parsed query reads back the same");
                }
                ApiAction::SetRequestedSize { node, .. } => {
                    assert_eq!(Some(u64::from(node)), number);
                }
                ApiAction::AgentCall { request } => {
                    assert!(serde_json::from_str::<serde_json::Value>(&request).is_ok());
                }
                _ => {}
            }
        }
    }
});
