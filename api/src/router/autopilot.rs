//! Routes of the autopilot: a node's settings and status, and the decision events.

use super::{node_id, unexpected, Params, Routed};
use crate::autopilot::AutopilotSettings;
use crate::http::{Request, Response};
use crate::types::{ApiAction, ApiReply};

fn status(reply: ApiReply) -> Response {
    match reply {
        ApiReply::Autopilot(status) => Response::json(200, &status),
        other => unexpected(other),
    }
}

pub(super) fn get_autopilot(_: &Request, params: &Params<'_>) -> Routed {
    match node_id(params) {
        Ok(node) => Routed::Vmm {
            action: ApiAction::GetAutopilot { node },
            on_reply: status,
        },
        Err(routed) => routed,
    }
}

pub(super) fn put_autopilot(request: &Request, params: &Params<'_>) -> Routed {
    let node = match node_id(params) {
        Ok(node) => node,
        Err(routed) => return routed,
    };
    const SHAPE: &str = "{\"mode\": \"off\"|\"release\"|\"autosize\", \"min_bytes\": <bytes>, \
                         \"max_bytes\": <bytes>, \"headroom_bytes\": <bytes>, \
                         \"interval_ms\": <ms>, \"patience_ms\": <ms>} (each optional)";
    match serde_json::from_slice::<AutopilotSettings>(&request.body) {
        Ok(settings) => Routed::Vmm {
            action: ApiAction::SetAutopilot { node, settings },
            on_reply: status,
        },
        Err(e) => Routed::Respond(Response::error(
            400,
            format!("invalid body, expected {SHAPE}: {e}"),
        )),
    }
}

/// `?since=N`: the events after sequence number N (all that are kept without it).
fn since(query: &str) -> Result<Option<u64>, String> {
    let mut since = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", n)) => {
                let n = n
                    .parse()
                    .map_err(|_| format!("since='{n}' is not a sequence number"))?;
                if since.replace(n).is_some() {
                    return Err("since is given twice".into());
                }
            }
            _ => return Err(format!("unknown parameter '{pair}' (expected since=N)")),
        }
    }
    Ok(since)
}

pub(super) fn get_events(request: &Request, _: &Params<'_>) -> Routed {
    match since(&request.query) {
        Ok(since) => Routed::Vmm {
            action: ApiAction::GetEvents { since },
            on_reply: |reply| match reply {
                ApiReply::Events(events) => Response::json(200, &events),
                other => unexpected(other),
            },
        },
        Err(why) => Routed::Respond(Response::error(400, format!("invalid query: {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::route;
    use super::*;
    use crate::autopilot::{AutopilotMode, AutopilotStatus};
    use crate::http::{Headers, Method};

    fn req(method: Method, path: &str, query: &str, body: &str) -> Request {
        Request {
            method,
            path: path.into(),
            query: query.into(),
            headers: Headers::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn settings_reach_the_vmm_with_the_fields_given() {
        let path = "/api/v1/nodes/1/autopilot";
        let Routed::Vmm { action, on_reply } = route(&req(Method::Get, path, "", "")) else {
            panic!("GET answered directly");
        };
        assert_eq!(action, ApiAction::GetAutopilot { node: 1 });
        let doc = AutopilotStatus {
            node: 1,
            mode: AutopilotMode::Autosize,
            min_bytes: 0,
            max_bytes: 1 << 30,
            headroom_bytes: 1 << 28,
            effective_headroom_bytes: 1 << 27,
            interval_ms: 1000,
            patience_ms: 30_000,
            paused_by_user: false,
            grows: 2,
            shrinks: 1,
            regrets: 0,
            samples: 9,
            holding: Some("comfortable".into()),
            last: None,
        };
        let r = on_reply(ApiReply::Autopilot(doc.clone()));
        assert_eq!(r.status, 200);
        assert_eq!(
            serde_json::from_slice::<AutopilotStatus>(&r.body).unwrap(),
            doc
        );
        assert_eq!(on_reply(ApiReply::Empty).status, 500);

        let body = r#"{"mode": "release", "headroom_bytes": 268435456}"#;
        let Routed::Vmm { action, .. } = route(&req(Method::Put, path, "", body)) else {
            panic!("PUT answered directly");
        };
        assert_eq!(
            action,
            ApiAction::SetAutopilot {
                node: 1,
                settings: AutopilotSettings {
                    mode: Some(AutopilotMode::Release),
                    headroom_bytes: Some(1 << 28),
                    ..Default::default()
                }
            }
        );
    }

    #[test]
    fn bad_settings_are_400_before_the_vmm() {
        let path = "/api/v1/nodes/0/autopilot";
        for body in [
            "",
            r#"{"mode": "on"}"#,
            r#"{"min_bytes": -1}"#,
            r#"{"interval_ms": "1s"}"#,
            r#"{"mode": "off", "extra": 1}"#,
        ] {
            let Routed::Respond(r) = route(&req(Method::Put, path, "", body)) else {
                panic!("{body:?} reached the VMM");
            };
            assert_eq!(r.status, 400, "{body:?}");
            assert!(r.error_message().unwrap().contains("autosize"), "{body:?}");
        }
        let Routed::Respond(r) = route(&req(Method::Put, "/api/v1/nodes/x/autopilot", "", "{}"))
        else {
            panic!("a bad node id reached the VMM");
        };
        assert_eq!(r.status, 404, "as on every route of a node");
    }

    #[test]
    fn events_take_an_optional_since() {
        for (query, since) in [("", None), ("since=7", Some(7))] {
            let Routed::Vmm { action, .. } = route(&req(Method::Get, "/api/v1/events", query, ""))
            else {
                panic!("{query:?} answered directly");
            };
            assert_eq!(action, ApiAction::GetEvents { since });
        }
        for query in ["since=x", "since=1&since=2", "until=3"] {
            let Routed::Respond(r) = route(&req(Method::Get, "/api/v1/events", query, "")) else {
                panic!("{query:?} reached the VMM");
            };
            assert_eq!(r.status, 400, "{query:?}");
        }
    }
}
