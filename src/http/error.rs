//! One mapping from an [`InferenceError`] to a status, a JSON body and a metric label ([`ApiError`]), and the JSON extractor whose rejections take that path.
#![forbid(unsafe_code)]

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::http::api::{ErrorBody, InferenceError};
use crate::models::ChangeError;
use crate::models::RepositoryLoadError;

use super::app::*;

/// An error answer.
#[derive(Debug)]
pub struct ApiError(pub InferenceError);

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = self.0.kind();
        let body = ErrorBody {
            message: self.0.to_string(),
            error: self.0,
        };
        let mut response = (status, Json(body)).into_response();
        // Counted once, by the middleware.
        response.extensions_mut().insert(CountedKind(kind));
        response
    }
}

/// A JSON body whose rejections (bad JSON, wrong types, too large) are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError(InferenceError::PayloadTooLarge {
                    message: format!("the body exceeds {MAX_BODY_BYTES} bytes"),
                }))
            }
            Err(rejection) if rejection.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Err(ApiError(InferenceError::UnsupportedMediaType {
                    message: rejection.body_text(),
                }))
            }
            Err(rejection) => Err(ApiError(InferenceError::InvalidRequest {
                message: rejection.body_text(),
            })),
        }
    }
}

/// Wraps a handler's result: errors become counted error responses.
pub(super) fn answer<T: IntoResponse>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(v) => v.into_response(),
        Err(e) => e.into_response(),
    }
}

/// The error of a refused change (nothing changed; the versions serving go on).
pub(super) fn change_error(e: ChangeError, model: &str) -> InferenceError {
    match e {
        ChangeError::Load(RepositoryLoadError::UnknownModel { model, .. }) => {
            InferenceError::ModelNotFound {
                model_name: model,
                served: Vec::new(),
            }
        }
        ChangeError::NotLoaded(key) => InferenceError::ModelNotFound {
            model_name: key,
            served: Vec::new(),
        },
        e @ ChangeError::LayoutChange { .. } => InferenceError::Conflict {
            message: e.to_string(),
        },
        ChangeError::Load(e) => InferenceError::LoadFailed {
            model_name: model.into(),
            message: e.to_string(),
        },
        ChangeError::Restore(why) => InferenceError::LoadFailed {
            model_name: model.into(),
            message: why,
        },
        ChangeError::Routing(e) => InferenceError::LoadFailed {
            model_name: "routing.toml".into(),
            message: e.to_string(),
        },
        ChangeError::Remote(crate::models::remote::RemoteError::Unreachable(why)) => {
            InferenceError::NotReady {
                model_name: model.into(),
                reason: format!("the model source is unreachable: {why}"),
            }
        }
        ChangeError::Remote(e) => InferenceError::LoadFailed {
            model_name: model.into(),
            message: format!("the model source: {e}"),
        },
    }
}
