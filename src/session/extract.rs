//! axum integration: `Session` as an extractor, `SessionError` as a response.

use axum_core::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::{request::Parts, StatusCode};

use super::{Session, SessionError};

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no session: add tower_pg_session::SessionLayer to the router (outside the routes that use Session)",
        ))
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        let status = match &self {
            SessionError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SessionError::ReservedKey { .. } => StatusCode::FORBIDDEN,
            SessionError::Unstorable { .. } => StatusCode::BAD_REQUEST,
            SessionError::Serde { .. } | SessionError::Unsupported(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, self.to_string()).into_response()
    }
}
