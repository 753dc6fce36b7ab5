-- Requests and tokens per minute a key may use, checked at admission.
ALTER TABLE api_keys ADD COLUMN rpm integer CHECK (rpm > 0);
ALTER TABLE api_keys ADD COLUMN tpm bigint CHECK (tpm > 0);
