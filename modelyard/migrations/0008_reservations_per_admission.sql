-- A budget reservation belongs to one admission of a job, not to its id:
-- producers choose job ids, and two admissions of one id are two
-- reservations. Existing reservations keep their job id as their name.
ALTER TABLE budget_reservations ADD COLUMN reservation text;
UPDATE budget_reservations SET reservation = job_id;
ALTER TABLE budget_reservations ALTER COLUMN reservation SET NOT NULL;
ALTER TABLE budget_reservations DROP CONSTRAINT budget_reservations_pkey;
ALTER TABLE budget_reservations ADD PRIMARY KEY (reservation, scope, subject);

-- Which reservation a billed call settles (and in which period it counts).
ALTER TABLE ledger ADD COLUMN reservation text;
