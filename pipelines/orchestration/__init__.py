"""What the Airflow DAGs (dags/) run, without Airflow, a module per job:

plan       DAG Params -> RunPlan (checked; versioned JSON between tasks), run ids
launcher   runs a step in a subprocess with the pipeline's interpreter (exit 3 = permanent)
steps      the steps: embed, build_index, publish (counts reconciled, Asset event extra)
handoff    tells the search service a new index version exists
params     Airflow Params, task defaults (retry policy), the index Asset
errors     OrchestrationError, StepError, PermanentStepError
"""
