//! The routing table: which method and path become which [`ApiAction`], and
//! how the VMM's [`ApiReply`] becomes a [`Response`].
//!
//! To add an endpoint, add a [`Route`] to [`ROUTES`] (patterns may hold
//! `{name}` segments, read back with [`Params::get`]) and a handler that
//! returns [`Routed::Vmm`] (or [`Routed::Respond`] for a bad request body).

mod autopilot;
mod balloon;
mod evacuation;

use crate::http::{quote, Method, Request, Response};
use crate::types::{ApiAction, ApiReply};

/// What the server does with a request.
pub(crate) enum Routed {
    /// Answer directly (404, 405, invalid body...).
    Respond(Response),
    /// Send `action` to the VMM and turn its successful reply into a
    /// response with `on_reply`. VMM errors become JSON error responses.
    Vmm {
        action: ApiAction,
        on_reply: fn(ApiReply) -> Response,
    },
}

/// Values of the `{name}` segments of a matched pattern.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Params<'a>(Vec<(&'static str, &'a str)>);

impl Params<'_> {
    /// The path segment matched by `{name}`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

type Handler = fn(&Request, &Params<'_>) -> Routed;

/// One path and the methods it accepts.
pub(crate) struct Route {
    pattern: &'static str,
    methods: &'static [(Method, Handler)],
}

/// Every endpoint of the API.
const ROUTES: &[Route] = &[
    Route {
        pattern: "/api/v1/vm",
        methods: &[(Method::Get, get_vm_info)],
    },
    Route {
        pattern: "/api/v1/vm/shutdown",
        methods: &[(Method::Put, shutdown)],
    },
    Route {
        pattern: "/api/v1/nodes",
        methods: &[(Method::Get, get_nodes)],
    },
    Route {
        pattern: "/api/v1/agent",
        methods: &[(Method::Get, get_agent)],
    },
    Route {
        pattern: "/api/v1/agent/call",
        methods: &[(Method::Post, agent_call)],
    },
    Route {
        pattern: "/api/v1/nodes/{id}/regions",
        methods: &[(Method::Get, get_regions)],
    },
    Route {
        pattern: "/api/v1/nodes/{id}/requested-size",
        methods: &[(Method::Put, set_requested_size)],
    },
    Route {
        pattern: "/api/v1/nodes/{id}/evacuations",
        methods: &[(Method::Post, evacuation::post_evacuations)],
    },
    Route {
        pattern: "/api/v1/nodes/{id}/compact",
        methods: &[(Method::Post, evacuation::post_compact)],
    },
    Route {
        pattern: "/api/v1/nodes/{id}/regions/{region}/plug",
        methods: &[(Method::Post, evacuation::plug_region)],
    },
    Route {
        pattern: "/api/v1/nodes/{id}/autopilot",
        methods: &[
            (Method::Get, autopilot::get_autopilot),
            (Method::Put, autopilot::put_autopilot),
        ],
    },
    Route {
        pattern: "/api/v1/events",
        methods: &[(Method::Get, autopilot::get_events)],
    },
    Route {
        pattern: "/api/v1/evacuations",
        methods: &[(Method::Get, evacuation::get_jobs)],
    },
    Route {
        pattern: "/api/v1/evacuations/{job}",
        methods: &[(Method::Get, evacuation::get_job)],
    },
    Route {
        pattern: "/metrics",
        methods: &[(Method::Get, evacuation::get_metrics)],
    },
    Route {
        pattern: "/api/v1/balloon",
        methods: &[
            (Method::Get, balloon::get_balloon),
            (Method::Put, balloon::put_balloon),
        ],
    },
];

/// Finds the handler of `request`: 404 if no pattern matches the path, 405
/// (with `Allow`) if some do but not with this method.
pub(crate) fn route(request: &Request) -> Routed {
    route_in(ROUTES, request)
}

/// What the server does with a parsed request: an action for the VMM, or the response
/// it gives itself (404, 405, a bad body). Public for the fuzz target.
pub fn dispatch(request: &Request) -> Result<ApiAction, Response> {
    match route(request) {
        Routed::Vmm { action, .. } => Ok(action),
        Routed::Respond(response) => Err(response),
    }
}

fn route_in(routes: &[Route], request: &Request) -> Routed {
    let mut allowed: Vec<Method> = Vec::new();
    for r in routes {
        let Some(params) = match_pattern(r.pattern, &request.path) else {
            continue;
        };
        if let Some((_, handler)) = r.methods.iter().find(|(m, _)| *m == request.method) {
            return handler(request, &params);
        }
        allowed.extend(r.methods.iter().map(|(m, _)| *m));
    }
    let path = quote(&request.path);
    if allowed.is_empty() {
        return Routed::Respond(Response::error(404, format!("no such endpoint: {path}")));
    }
    let allow = allowed
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Routed::Respond(
        Response::error(
            405,
            format!(
                "method {} not allowed on {path}; allowed: {allow}",
                request.method
            ),
        )
        .with_header("Allow", allow),
    )
}

/// Matches `path` against `pattern` segment by segment; `{name}` matches any
/// non-empty segment.
fn match_pattern<'a>(pattern: &'static str, path: &'a str) -> Option<Params<'a>> {
    let mut params = Params::default();
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') && !g.is_empty() => {
                params.0.push((&w[1..w.len() - 1], g));
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return None,
        }
    }
}

fn get_vm_info(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::GetVmInfo,
        on_reply: |reply| match reply {
            ApiReply::VmInfo(info) => Response::json(200, &info),
            other => unexpected(other),
        },
    }
}

fn shutdown(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::Shutdown,
        on_reply: no_content,
    }
}

/// 204 for [`ApiReply::Empty`].
fn get_nodes(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::GetNodes,
        on_reply: |reply| match reply {
            ApiReply::Nodes(nodes) => Response::json(200, &nodes),
            other => unexpected(other),
        },
    }
}

fn get_agent(_: &Request, _: &Params<'_>) -> Routed {
    Routed::Vmm {
        action: ApiAction::GetAgent,
        on_reply: |reply| match reply {
            ApiReply::Agent(info) => Response::json(200, &info),
            other => unexpected(other),
        },
    }
}

fn agent_call(request: &Request, _: &Params<'_>) -> Routed {
    match std::str::from_utf8(&request.body) {
        Ok(body) if serde_json::from_str::<serde_json::Value>(body).is_ok() => Routed::Vmm {
            action: ApiAction::AgentCall {
                request: body.to_string(),
            },
            on_reply: |reply| match reply {
                ApiReply::AgentResponse(json) => {
                    Response::text(200, json).with_content_type(crate::http::CONTENT_TYPE_JSON)
                }
                other => unexpected(other),
            },
        },
        _ => Routed::Respond(Response::error(
            400,
            "the body must be one agent request as JSON, e.g. {\"type\":\"inventory\"}",
        )),
    }
}

/// A node id in a path: anything but a number names no node.
fn node_id(params: &Params<'_>) -> Result<u32, Routed> {
    let id = params.get("id").unwrap_or("");
    id.parse()
        .map_err(|_| Routed::Respond(Response::error(404, format!("no such node: {}", quote(id)))))
}

fn get_regions(request: &Request, params: &Params<'_>) -> Routed {
    let node = match node_id(params) {
        Ok(node) => node,
        Err(routed) => return routed,
    };
    match crate::evacuation::RegionQuery::parse(&request.query) {
        Ok(query) => Routed::Vmm {
            action: ApiAction::GetRegions { node, query },
            on_reply: |reply| match reply {
                ApiReply::Regions(regions) => Response::json(200, &regions),
                other => unexpected(other),
            },
        },
        Err(why) => Routed::Respond(Response::error(400, format!("invalid query: {why}"))),
    }
}

fn set_requested_size(request: &Request, params: &Params<'_>) -> Routed {
    let node = match node_id(params) {
        Ok(node) => node,
        Err(routed) => return routed,
    };
    match serde_json::from_slice::<crate::types::RequestedSize>(&request.body) {
        Ok(body) => Routed::Vmm {
            action: ApiAction::SetRequestedSize {
                node,
                bytes: body.requested_size,
            },
            on_reply: no_content,
        },
        Err(e) => Routed::Respond(Response::error(
            400,
            format!("invalid body, expected {{\"requested_size\": <bytes>}}: {e}"),
        )),
    }
}

fn no_content(reply: ApiReply) -> Response {
    match reply {
        ApiReply::Empty => Response::new(204),
        other => unexpected(other),
    }
}

/// The VMM answered with the wrong kind of reply: a bug, reported as 500.
fn unexpected(reply: ApiReply) -> Response {
    let kind = match reply {
        ApiReply::VmInfo(_) => "VmInfo",
        ApiReply::Nodes(_) => "Nodes",
        ApiReply::Agent(_) => "Agent",
        ApiReply::AgentResponse(_) => "AgentResponse",
        ApiReply::Regions(_) => "Regions",
        ApiReply::Accepted(_) => "Accepted",
        ApiReply::Job(_) => "Job",
        ApiReply::Jobs(_) => "Jobs",
        ApiReply::Node(_) => "Node",
        ApiReply::Metrics(_) => "Metrics",
        ApiReply::Balloon(_) => "Balloon",
        ApiReply::Autopilot(_) => "Autopilot",
        ApiReply::Events(_) => "Events",
        ApiReply::Empty => "Empty",
    };
    Response::error(
        500,
        format!("internal error: unexpected {kind} reply from the VMM"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Headers;

    fn req(method: Method, path: &str) -> Request {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        Request {
            method,
            path: path.into(),
            query: query.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    fn respond(routed: Routed) -> Response {
        match routed {
            Routed::Respond(r) => r,
            Routed::Vmm { action, .. } => panic!("routed to the VMM: {action:?}"),
        }
    }

    fn action(routed: Routed) -> (ApiAction, fn(ApiReply) -> Response) {
        match routed {
            Routed::Vmm { action, on_reply } => (action, on_reply),
            Routed::Respond(r) => panic!("answered {}", r.status),
        }
    }

    #[test]
    fn known_routes() {
        let (a, on_reply) = action(route(&req(Method::Get, "/api/v1/vm")));
        assert_eq!(a, ApiAction::GetVmInfo);
        assert_eq!(on_reply(ApiReply::Empty).status, 500);
        let (a, on_reply) = action(route(&req(Method::Put, "/api/v1/vm/shutdown")));
        assert_eq!(a, ApiAction::Shutdown);
        assert_eq!(on_reply(ApiReply::Empty).status, 204);
        let (a, on_reply) = action(route(&req(Method::Get, "/api/v1/nodes")));
        assert_eq!(a, ApiAction::GetNodes);
        assert_eq!(on_reply(ApiReply::Nodes(vec![])).status, 200);
        assert_eq!(on_reply(ApiReply::Empty).status, 500);
        let (a, on_reply) = action(route(&req(Method::Get, "/api/v1/nodes/1/regions")));
        assert_eq!(
            a,
            ApiAction::GetRegions {
                node: 1,
                query: Default::default()
            }
        );
        assert_eq!(on_reply(ApiReply::Regions(vec![])).status, 200);
        let (a, _) = action(route(&req(
            Method::Get,
            "/api/v1/nodes/1/regions?state=plugged&limit=10",
        )));
        let ApiAction::GetRegions { query, .. } = a else {
            panic!("{a:?}");
        };
        assert_eq!(
            (query.state, query.limit),
            (Some(crate::RegionState::Plugged), Some(10))
        );
        let bad = respond(route(&req(Method::Get, "/api/v1/nodes/1/regions?state=x")));
        assert_eq!(bad.status, 400);
        assert!(bad
            .error_message()
            .unwrap()
            .starts_with("invalid query: state must be"));
        assert_eq!(
            respond(route(&req(Method::Get, "/api/v1/nodes/x/regions"))).status,
            404
        );
        let (a, on_reply) = action(route(&req(Method::Get, "/api/v1/agent")));
        assert_eq!(a, ApiAction::GetAgent);
        assert_eq!(on_reply(ApiReply::Agent(Default::default())).status, 200);
        let mut call = req(Method::Post, "/api/v1/agent/call");
        call.body = br#"{"type":"inventory"}"#.to_vec();
        let (a, on_reply) = action(route(&call));
        assert_eq!(
            a,
            ApiAction::AgentCall {
                request: r#"{"type":"inventory"}"#.into()
            }
        );
        let r = on_reply(ApiReply::AgentResponse("{}".into()));
        assert_eq!((r.status, r.body.as_slice()), (200, b"{}".as_slice()));
        for bad in [&b""[..], b"{", b"\xff"] {
            call.body = bad.to_vec();
            assert_eq!(respond(route(&call)).status, 400);
        }
    }

    fn put(path: &str, body: &str) -> Request {
        Request {
            body: body.as_bytes().to_vec(),
            ..req(Method::Put, path)
        }
    }

    #[test]
    fn requested_size_is_parsed_and_validated() {
        let (a, on_reply) = action(route(&put(
            "/api/v1/nodes/1/requested-size",
            r#"{"requested_size": 268435456}"#,
        )));
        assert_eq!(
            a,
            ApiAction::SetRequestedSize {
                node: 1,
                bytes: 256 << 20
            }
        );
        assert_eq!(on_reply(ApiReply::Empty).status, 204);
        for body in [
            "",
            "{}",
            "[]",
            r#"{"requested_size": -1}"#,
            r#"{"requested_size": "1G"}"#,
            r#"{"requested_size": 1, "x": 2}"#,
            "{",
        ] {
            let r = respond(route(&put("/api/v1/nodes/1/requested-size", body)));
            assert_eq!(r.status, 400, "{body:?}");
            assert!(
                r.error_message().unwrap().contains("requested_size"),
                "{body:?}"
            );
        }
        for id in ["x", "-1", "99999999999"] {
            let r = respond(route(&put(
                &format!("/api/v1/nodes/{id}/requested-size"),
                r#"{"requested_size": 0}"#,
            )));
            assert_eq!(r.status, 404, "{id}");
            assert!(r.error_message().unwrap().contains("no such node"));
        }
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            "/",
            "/api/v1",
            "/api/v1/vm/",
            "/api/v1/vmx",
            "/api/v1/vm/shutdown/now",
        ] {
            let r = respond(route(&req(Method::Get, path)));
            assert_eq!(r.status, 404, "{path}");
            assert!(r.error_message().unwrap().contains(path));
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let r = respond(route(&req(Method::Delete, "/api/v1/vm")));
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET"));
        let r = respond(route(&req(Method::Get, "/api/v1/vm/shutdown")));
        assert_eq!(r.header("Allow"), Some("PUT"));
        assert!(r.error_message().unwrap().contains("GET"));
    }

    #[test]
    fn patterns_with_params() {
        let p = match_pattern("/a/{id}/b", "/a/7/b").unwrap();
        assert_eq!(p.get("id"), Some("7"));
        assert_eq!(p.get("other"), None);
        assert!(match_pattern("/a/{id}/b", "/a//b").is_none());
        assert!(match_pattern("/a/{id}", "/a/7/b").is_none());
        assert!(match_pattern("/a/{id}/b", "/a/7").is_none());

        fn node(_: &Request, p: &Params<'_>) -> Routed {
            Routed::Respond(Response::text(200, p.get("id").unwrap_or_default()))
        }
        let routes = [
            Route {
                pattern: "/nodes/{id}",
                methods: &[(Method::Get, node)],
            },
            Route {
                pattern: "/nodes/all",
                methods: &[(Method::Delete, node)],
            },
        ];
        let r = respond(route_in(&routes, &req(Method::Get, "/nodes/3")));
        assert_eq!(r.body, b"3");
        let r = respond(route_in(&routes, &req(Method::Put, "/nodes/all")));
        assert_eq!(r.header("allow"), Some("GET, DELETE"));
    }

    #[test]
    fn every_route_is_in_the_openapi_file() {
        let spec = include_str!("../openapi.yaml");
        for r in ROUTES {
            let path = r.pattern.strip_prefix("/api/v1").unwrap_or(r.pattern);
            assert!(
                spec.lines().any(|l| l == format!("  {path}:")),
                "{path} is missing from openapi.yaml"
            );
            for (method, _) in r.methods {
                let m = method.as_str().to_ascii_lowercase();
                let section = spec.split(&format!("\n  {path}:\n")).nth(1).unwrap_or("");
                let section = section.split("\n  /").next().unwrap_or("");
                let section = format!("\n{section}");
                assert!(
                    section.contains(&format!("\n    {m}:")),
                    "{m} {path} is missing"
                );
            }
        }
    }

    #[test]
    fn table_is_well_formed() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert!(r.pattern.starts_with('/') && !r.pattern.ends_with('/'));
            assert!(!r.methods.is_empty());
            assert!(ROUTES[i + 1..].iter().all(|o| o.pattern != r.pattern));
        }
    }
}
