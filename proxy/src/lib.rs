//! podsteer-proxy
