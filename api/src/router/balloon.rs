//! Routes of the balloon.

use super::{unexpected, Params, Routed};
use crate::balloon::BalloonTarget;
use crate::http::{Request, Response};
use crate::types::{ApiAction, ApiReply};

fn status(reply: ApiReply) -> Response {
    match reply {
        ApiReply::Balloon(status) => Response::json(200, &status),
        other => unexpected(other),
    }
}

pub(super) fn get_balloon(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::GetBalloon,
        on_reply: status,
    }
}

pub(super) fn put_balloon(request: &Request, _: &Params<'_>) -> Routed {
    match serde_json::from_slice::<BalloonTarget>(&request.body) {
        Ok(body) => Routed::Vmm {
            action: ApiAction::SetBalloonTarget {
                bytes: body.target_bytes,
            },
            on_reply: status,
        },
        Err(e) => Routed::Respond(Response::error(
            400,
            format!("invalid body, expected {{\"target_bytes\": <bytes>}}: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::route;
    use super::*;
    use crate::balloon::BalloonStatus;
    use crate::http::{Headers, Method};

    fn req(method: Method, body: &str) -> Request {
        Request {
            method,
            path: "/api/v1/balloon".into(),
            query: String::new(),
            headers: Headers::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn status_doc() -> BalloonStatus {
        BalloonStatus {
            target_bytes: 1 << 27,
            actual_bytes: 1 << 27,
            inflated_bytes: 1 << 27,
            reported_bytes: 0,
            discarded_bytes: 1 << 27,
            driver_ready: true,
            free_page_reporting: true,
            deflate_on_oom: false,
            stats_interval_ms: None,
            stats: None,
            counters: Default::default(),
        }
    }

    #[test]
    fn get_and_put_reach_the_vmm() {
        let Routed::Vmm { action, on_reply } = route(&req(Method::Get, "")) else {
            panic!("GET answered directly");
        };
        assert_eq!(action, ApiAction::GetBalloon);
        let r = on_reply(ApiReply::Balloon(status_doc()));
        assert_eq!(r.status, 200);
        let back: BalloonStatus = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(back, status_doc());
        assert!(!String::from_utf8_lossy(&r.body).contains("stats_interval_ms"));
        assert_eq!(on_reply(ApiReply::Empty).status, 500);

        let Routed::Vmm { action, .. } = route(&req(Method::Put, r#"{"target_bytes": 134217728}"#))
        else {
            panic!("PUT answered directly");
        };
        assert_eq!(action, ApiAction::SetBalloonTarget { bytes: 1 << 27 });
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [
            "",
            "{}",
            r#"{"target_bytes": -1}"#,
            r#"{"target_bytes": "1G"}"#,
            r#"{"target_bytes": 1, "x": 2}"#,
            r#"{"target_bytes": 1e3}"#,
        ] {
            let Routed::Respond(r) = route(&req(Method::Put, body)) else {
                panic!("{body:?} reached the VMM");
            };
            assert_eq!(r.status, 400, "{body:?}");
            assert!(r.error_message().unwrap().contains("target_bytes"));
        }
        let Routed::Respond(r) = route(&req(Method::Post, "")) else {
            panic!("POST reached the VMM");
        };
        assert_eq!((r.status, r.header("allow")), (405, Some("GET, PUT")));
    }
}
