//! Routes of evacuations, compaction, plugging and metrics.

use super::{node_id, unexpected, Params, Routed};
use crate::evacuation::{CompactRequest, EvacuationRequest};
use crate::http::{quote, Request, Response};
use crate::types::{ApiAction, ApiReply};

/// Prometheus' text exposition format.
const CONTENT_TYPE_PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// 202 with the job's id and where to follow it.
fn accepted(reply: ApiReply) -> Response {
    match reply {
        ApiReply::Accepted(job) => {
            let href = job.href.clone();
            Response::json(202, &job).with_header("Location", href)
        }
        other => unexpected(other),
    }
}

fn bad_body(what: &str, e: serde_json::Error) -> Routed {
    Routed::Respond(Response::error(
        400,
        format!("invalid body, expected {what}: {e}"),
    ))
}

pub(super) fn post_evacuations(request: &Request, params: &Params<'_>) -> Routed {
    let node = match node_id(params) {
        Ok(node) => node,
        Err(routed) => return routed,
    };
    const SHAPE: &str = "{\"regions\": [<region>, ...], \"allow_other_nodes\": <bool>}";
    match serde_json::from_slice::<EvacuationRequest>(&request.body) {
        Ok(body) if body.regions.is_empty() => Routed::Respond(Response::error(
            400,
            format!("invalid body, expected {SHAPE}: no regions given"),
        )),
        Ok(body) => Routed::Vmm {
            action: ApiAction::Evacuate {
                node,
                regions: body.regions,
                allow_other_nodes: body.allow_other_nodes,
            },
            on_reply: accepted,
        },
        Err(e) => bad_body(SHAPE, e),
    }
}

pub(super) fn post_compact(request: &Request, params: &Params<'_>) -> Routed {
    let node = match node_id(params) {
        Ok(node) => node,
        Err(routed) => return routed,
    };
    const SHAPE: &str = "{\"release_bytes\": <bytes>, \"allow_other_nodes\": <bool>}";
    match serde_json::from_slice::<CompactRequest>(&request.body) {
        Ok(body) if body.release_bytes == 0 => Routed::Respond(Response::error(
            400,
            format!("invalid body, expected {SHAPE}: release_bytes must be more than 0"),
        )),
        Ok(body) => Routed::Vmm {
            action: ApiAction::Compact {
                node,
                release_bytes: body.release_bytes,
                allow_other_nodes: body.allow_other_nodes,
            },
            on_reply: accepted,
        },
        Err(e) => bad_body(SHAPE, e),
    }
}

pub(super) fn get_job(_: &Request, params: &Params<'_>) -> Routed {
    let job = params.get("job").unwrap_or("");
    match job.parse() {
        Ok(id) => Routed::Vmm {
            action: ApiAction::GetJob { id },
            on_reply: |reply| match reply {
                ApiReply::Job(job) => Response::json(200, &job),
                other => unexpected(other),
            },
        },
        Err(_) => Routed::Respond(Response::error(404, format!("no such job: {}", quote(job)))),
    }
}

pub(super) fn get_jobs(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::GetJobs,
        on_reply: |reply| match reply {
            ApiReply::Jobs(jobs) => Response::json(200, &jobs),
            other => unexpected(other),
        },
    }
}

pub(super) fn plug_region(_: &Request, params: &Params<'_>) -> Routed {
    let node = match node_id(params) {
        Ok(node) => node,
        Err(routed) => return routed,
    };
    let region = params.get("region").unwrap_or("");
    match region.parse() {
        Ok(region) => Routed::Vmm {
            action: ApiAction::PlugRegion { node, region },
            on_reply: |reply| match reply {
                ApiReply::Node(status) => Response::json(202, &status),
                other => unexpected(other),
            },
        },
        Err(_) => Routed::Respond(Response::error(
            404,
            format!("no such region: {}", quote(region)),
        )),
    }
}

pub(super) fn get_metrics(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::GetMetrics,
        on_reply: |reply| match reply {
            ApiReply::Metrics(text) => {
                Response::text(200, text).with_content_type(CONTENT_TYPE_PROMETHEUS)
            }
            other => unexpected(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::route;
    use super::*;
    use crate::evacuation::JobAccepted;
    use crate::http::{Headers, Method};

    fn req(method: Method, path: &str, body: &str) -> Request {
        Request {
            method,
            path: path.into(),
            query: String::new(),
            headers: Headers::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    type OnReply = fn(ApiReply) -> Response;

    fn routed(method: Method, path: &str, body: &str) -> Result<(ApiAction, OnReply), Response> {
        match route(&req(method, path, body)) {
            Routed::Vmm { action, on_reply } => Ok((action, on_reply)),
            Routed::Respond(r) => Err(r),
        }
    }

    #[test]
    fn evacuations_take_a_list_of_regions() {
        let (a, on_reply) = routed(
            Method::Post,
            "/api/v1/nodes/1/evacuations",
            r#"{"regions":[0,3]}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            ApiAction::Evacuate {
                node: 1,
                regions: vec![0, 3],
                allow_other_nodes: false,
            }
        );
        let (a, _) = routed(
            Method::Post,
            "/api/v1/nodes/1/evacuations",
            r#"{"regions":[2],"allow_other_nodes":true}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            ApiAction::Evacuate {
                node: 1,
                regions: vec![2],
                allow_other_nodes: true,
            }
        );
        let r = on_reply(ApiReply::Accepted(JobAccepted::new(9)));
        assert_eq!(
            (r.status, r.header("location")),
            (202, Some("/api/v1/evacuations/9"))
        );
        assert_eq!(on_reply(ApiReply::Empty).status, 500);
        for body in [
            "",
            "{}",
            r#"{"regions":[]}"#,
            r#"{"regions":[-1]}"#,
            r#"{"regions":"1"}"#,
            r#"{"regions":[1],"force":true}"#,
            r#"{"regions":[1],"allow_other_nodes":"yes"}"#,
        ] {
            let r = routed(Method::Post, "/api/v1/nodes/1/evacuations", body).unwrap_err();
            assert_eq!(r.status, 400, "{body:?}");
            assert!(r.error_message().unwrap().contains("regions"), "{body:?}");
        }
        // 10,000 regions (20 KB, within the body limit): refused past the cap.
        let body = format!(r#"{{"regions":{:?}}}"#, vec![0; 10_000]);
        let r = routed(Method::Post, "/api/v1/nodes/0/evacuations", &body).unwrap_err();
        assert_eq!(r.status, 400);
        assert!(
            r.error_message()
                .unwrap()
                .contains("more than 8192 regions"),
            "{:?}",
            r.error_message()
        );
        let r = routed(
            Method::Post,
            "/api/v1/nodes/x/evacuations",
            r#"{"regions":[1]}"#,
        )
        .unwrap_err();
        assert_eq!(r.status, 404);
        let r = routed(Method::Get, "/api/v1/nodes/1/evacuations", "").unwrap_err();
        assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    }

    #[test]
    fn compaction_needs_a_positive_size() {
        let (a, _) = routed(
            Method::Post,
            "/api/v1/nodes/0/compact",
            r#"{"release_bytes":134217728}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            ApiAction::Compact {
                node: 0,
                release_bytes: 128 << 20,
                allow_other_nodes: false,
            }
        );
        let (a, _) = routed(
            Method::Post,
            "/api/v1/nodes/0/compact",
            r#"{"release_bytes":1,"allow_other_nodes":true}"#,
        )
        .unwrap();
        assert!(matches!(
            a,
            ApiAction::Compact {
                allow_other_nodes: true,
                ..
            }
        ));
        for body in [
            "",
            r#"{"release_bytes":0}"#,
            r#"{"release_bytes":-5}"#,
            r#"{"bytes":5}"#,
        ] {
            let r = routed(Method::Post, "/api/v1/nodes/0/compact", body).unwrap_err();
            assert_eq!(r.status, 400, "{body:?}");
            assert!(
                r.error_message().unwrap().contains("release_bytes"),
                "{body:?}"
            );
        }
    }

    #[test]
    fn jobs_plug_and_metrics() {
        let (a, _) = routed(Method::Get, "/api/v1/evacuations/12", "").unwrap();
        assert_eq!(a, ApiAction::GetJob { id: 12 });
        assert_eq!(
            routed(Method::Get, "/api/v1/evacuations/x", "")
                .unwrap_err()
                .status,
            404
        );
        let (a, on_reply) = routed(Method::Get, "/api/v1/evacuations", "").unwrap();
        assert_eq!(a, ApiAction::GetJobs);
        assert_eq!(on_reply(ApiReply::Jobs(vec![])).body, b"[]");
        let (a, _) = routed(Method::Post, "/api/v1/nodes/1/regions/2/plug", "").unwrap();
        assert_eq!(a, ApiAction::PlugRegion { node: 1, region: 2 });
        assert_eq!(
            routed(Method::Post, "/api/v1/nodes/1/regions/-2/plug", "")
                .unwrap_err()
                .status,
            404
        );
        let (a, on_reply) = routed(Method::Get, "/metrics", "").unwrap();
        assert_eq!(a, ApiAction::GetMetrics);
        let r = on_reply(ApiReply::Metrics("a 1\n".into()));
        assert_eq!(r.status, 200);
        assert!(r.content_type.unwrap().contains("version=0.0.4"));
    }
}
