
app_name = "migrations"
urlpatterns = []
